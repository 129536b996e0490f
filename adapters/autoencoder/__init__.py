"""``autoencoder``: the convolutional autoencoder baseline (L2 reconstruction error)."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from bench.detector import FIT_SCOPES
from bench.params import Range
from bench.registry import register_detector
from bench.training import TrainableDetector
from bench.types import Batch, Prediction

from ..common import gaussian_blur, image_score


def _encoder(latent: int, width: int) -> nn.Sequential:
    chans = [3, width, width, 2 * width, 2 * width, 4 * width]
    layers: list[nn.Module] = []
    for a, b in zip(chans[:-1], chans[1:]):
        layers += [nn.Conv2d(a, b, 4, 2, 1), nn.BatchNorm2d(b), nn.LeakyReLU(0.2)]
    layers += [nn.Conv2d(chans[-1], latent, 4)]  # 4x4 -> 1x1 latent code
    return nn.Sequential(*layers)


def _decoder(latent: int, width: int) -> nn.Sequential:
    chans = [4 * width, 2 * width, 2 * width, width, width]
    layers: list[nn.Module] = [nn.ConvTranspose2d(latent, chans[0], 4), nn.LeakyReLU(0.2)]
    for a, b in zip(chans[:-1], chans[1:]):
        layers += [nn.ConvTranspose2d(a, b, 4, 2, 1), nn.BatchNorm2d(b), nn.LeakyReLU(0.2)]
    layers += [nn.ConvTranspose2d(chans[-1], 3, 4, 2, 1), nn.Sigmoid()]
    return nn.Sequential(*layers)


@register_detector("autoencoder")
class AutoEncoder(TrainableDetector):
    """Convolutional autoencoder with L2 reconstruction error (AE-L2, Bergmann et al. 2019).

    Trained with Adam on the defect-free images at ``input_size`` (128 px, the paper's patch
    size); the anomaly map is the per-pixel squared error averaged over colour channels,
    smoothed; the image score is the map's maximum.
    """

    modality = "image"
    #: its fit uses whatever images it is given: every scope applies
    fit_scopes = FIT_SCOPES

    def __init__(
        self,
        input_size: Literal[128] = 128,  # the architecture maps 128 px to a 1x1 code and back
        latent: Annotated[int, Range(ge=1)] = 100,
        width: Annotated[int, Range(ge=1)] = 32,
        iterations: Annotated[int, Range(ge=1)] = 2000,
        lr: Annotated[float, Range(gt=0)] = 2e-4,
        weight_decay: Annotated[float, Range(ge=0)] = 1e-5,
        amp: Literal["auto", "bf16", "fp16", "off"] = "auto",
        grad_clip: Annotated[float, Range(ge=0)] | None = None,  # 0 or unset: no clipping
        checkpoint_every: Annotated[int, Range(ge=1)] = 500,
        sigma: Annotated[float, Range(ge=0)] = 2.0,
        score: Literal["max", "topk"] = "max",
    ) -> None:
        self.input_size, self.latent, self.width = input_size, latent, width
        self.iterations, self.lr, self.weight_decay = iterations, lr, weight_decay
        self.amp, self.grad_clip, self.checkpoint_every = amp, grad_clip, checkpoint_every
        self.sigma, self.score = sigma, score

    def _input(self, batch: Batch) -> torch.Tensor:
        x = batch.image.to(self.device)
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(
                x,
                size=(self.input_size, self.input_size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        return x

    def build(self, example: Batch) -> None:
        self.model_ = nn.Sequential(
            _encoder(self.latent, self.width), _decoder(self.latent, self.width)
        )

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.model_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return opt, None

    def training_step(self, batch: Batch, step: int) -> torch.Tensor:
        x = self._input(batch)
        return F.mse_loss(self.model_(x).float(), x)

    @torch.no_grad()
    def predict(self, batch: Batch) -> Prediction:
        x = self._input(batch)
        error = ((self.model_(x).float() - x) ** 2).mean(1)
        maps = gaussian_blur(error, self.sigma)
        return Prediction(score=image_score(maps, self.score), anomaly_map=maps)
