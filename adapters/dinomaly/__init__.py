"""``dinomaly``: reconstruction of frozen foundation-model features through a noisy bottleneck
and a linear-attention decoder (Guo et al., CVPR 2025), and its Dinomaly2 variant."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F

from bench.backbones import normalize
from bench.detector import FIT_SCOPES
from bench.params import Length, Range
from bench.registry import register_detector
from bench.training import TrainableDetector
from bench.types import Batch, Prediction

from .checks import check_dinomaly
from .depth import rgb_and_depth
from .encoder import SUBSTITUTE, create_encoder
from .loss import anomaly_maps, global_cosine_hard_mining, mining_fraction, top_mean
from .network import Reconstructor
from .optim import StableAdamW, warm_cosine

#: timm names of Meta's DINOv2 weights with 4 registers
VIT_B, VIT_S = "vit_base_patch14_reg4_dinov2.lvd142m", "vit_small_patch14_reg4_dinov2.lvd142m"
INPUTS = ("rgb", "rgb+depth")


def paper_encoder(variant: str = "dinomaly", inputs: str = "rgb") -> str:
    """The official encoder: ViT-B/14 for Dinomaly and for Dinomaly2's RGB + depth script
    (``dinomaly_mvtec3d.py``), ViT-S/14 for Dinomaly2 on images (``dinomaly_2D.py``)."""
    return VIT_S if variant == "dinomaly2" and inputs == "rgb" else VIT_B


@register_detector("dinomaly")
class Dinomaly(TrainableDetector):
    """Dinomaly: a frozen encoder (DINOv2 ViT-B/14 with registers), the mean of its ``layers``
    through a noisy MLP bottleneck (dropout), ``decoder_depth`` linear-attention blocks, and a
    loose reconstruction loss: encoder and (reversed) decoder layers averaged in two groups,
    1 - global cosine per group, the easiest points' gradients damped (hard mining).

    Anomaly map: per group 1 - cosine per token, upsampled to the input, averaged, resized to
    ``map_size`` and smoothed (5x5 Gaussian, sigma 4); image score: the mean of its top
    ``top_fraction``. Paper geometry: inputs resized to 448 and centre-cropped to 392 (set
    ``image_size``/``crop_size`` in the config entry, as bench/configs/dinomaly-mvtec.toml does).

    ``variant="dinomaly2"``: narrow bottleneck (d -> 256 -> 4d -> d), dropout 0.4, lr 2e-4 on its
    first layer, no AMSGrad, no cosine decay, an eps of 1e-8 in the attention, 40,000
    iterations, and context-aware recentring of the encoder targets (each group's patch tokens
    minus its class token, then LayerNorm without affine); ViT-S/14 by default. Options left as
    None take the variant's value. ``encoder="efficientnet_lite0"`` is the offline substitute
    (packaged ImageNet weights), named as such in every record.

    ``inputs="rgb+depth"`` (Dinomaly2 on MVTec 3D-AD, modality ``rgb+point_cloud``): the RGB
    image and the scan's colourised depth (``depth.py``) pass the frozen encoder as one doubled
    batch and each layer is ``rgb_weight`` x RGB + (1 - ``rgb_weight``) x depth; ViT-B/14 and
    one learning rate for the whole bottleneck, as the official ``dinomaly_mvtec3d.py``.
    """

    modality = "image"
    resampling = "pil-bilinear"  # the official loader: torchvision Resize on PIL images
    also_accepts = ("rgb+point_cloud",)
    #: learns from whatever normal images it is given: the paper's unified setting is a scope
    fit_scopes = FIT_SCOPES
    #: the pretrained encoder, built from the parameters on first use, never saved
    frozen = ("_encoder",)

    def __init__(
        self,
        variant: Literal["dinomaly", "dinomaly2"] = "dinomaly",
        inputs: Literal["rgb", "rgb+depth"] = "rgb",
        rgb_weight: Annotated[float, Range(ge=0, le=1)] = 0.5,
        depth_fill: Annotated[int, Range(ge=0)] = 3,
        encoder: str | None = None,
        weights: str = "pretrained",
        layers: Annotated[tuple[Annotated[int, Range(ge=0)], ...], Length(min=2)] | None = None,
        encoder_depth: Annotated[int, Range(ge=1)] | None = None,
        decoder_depth: Annotated[int, Range(ge=1)] = 8,
        decoder_heads: Annotated[int, Range(ge=1)] | None = None,
        dropout: Annotated[float, Range(ge=0, lt=1)] | None = None,
        narrow: Annotated[int, Range(ge=1)] | None = None,
        attention_eps: Annotated[float, Range(ge=0)] | None = None,
        iterations: Annotated[int, Range(ge=1)] | None = None,
        lr: Annotated[float, Range(gt=0)] = 2e-3,
        lr_final: Annotated[float, Range(ge=0)] | None = None,
        narrow_lr: Annotated[float, Range(gt=0)] | None = None,
        warmup: Annotated[int, Range(ge=0)] = 100,
        weight_decay: Annotated[float, Range(ge=0)] = 1e-4,
        amsgrad: bool | None = None,
        eps: Annotated[float, Range(ge=0)] = 1e-10,
        grad_clip: Annotated[float, Range(ge=0)] | None = 0.1,
        hard_mining: Annotated[float, Range(ge=0, le=1)] = 0.9,
        hard_mining_ramp: Annotated[int, Range(ge=0)] = 1000,
        hard_factor: Annotated[float, Range(ge=0, le=1)] = 0.1,
        recentre: bool | None = None,
        map_size: Annotated[int, Range(ge=1)] | None = 256,
        smoothing_kernel: Annotated[int, Range(ge=1)] = 5,
        sigma: Annotated[float, Range(ge=0)] = 4.0,
        top_fraction: Annotated[float, Range(gt=0, le=1)] = 0.01,
        compile: bool = False,
        amp: Literal["auto", "bf16", "fp16", "off"] = "auto",
        checkpoint_every: Annotated[int, Range(ge=1)] = 1000,
    ) -> None:
        v2 = variant == "dinomaly2"
        self.variant, self.inputs = variant, inputs
        self.rgb_weight, self.depth_fill = rgb_weight, depth_fill
        self.encoder = paper_encoder(variant, inputs) if encoder is None else encoder
        self.weights, self.encoder_depth = weights, encoder_depth
        self.layers = None if layers is None else tuple(layers)
        if self.layers is not None and (len(self.layers) < 2 or len(self.layers) % 2):
            raise ValueError(f"layers must be an even number (two groups), got {self.layers}")
        self.decoder_depth, self.decoder_heads = decoder_depth, decoder_heads
        if decoder_depth % 2:
            raise ValueError(f"decoder_depth must be even (two groups), got {decoder_depth}")
        # options left as None take the variant's value (Dinomaly / Dinomaly2)
        self.dropout = (0.4 if v2 else 0.2) if dropout is None else dropout
        self.narrow = (256 if v2 else None) if narrow is None else narrow
        self.lr_final = (None if v2 else 2e-4) if lr_final is None else lr_final
        # the official RGB + depth script trains the whole bottleneck at one learning rate
        self.narrow_lr = (
            (2e-4 if v2 and inputs == "rgb" else None) if narrow_lr is None else narrow_lr
        )
        self.amsgrad = (not v2) if amsgrad is None else amsgrad
        self.recentre = v2 if recentre is None else recentre
        self.attention_eps = (1e-8 if v2 else 0.0) if attention_eps is None else attention_eps
        self.iterations = (40000 if v2 else 10000) if iterations is None else iterations
        self.lr = lr
        self.warmup, self.weight_decay, self.eps = warmup, weight_decay, eps
        self.grad_clip = grad_clip
        self.hard_mining, self.hard_mining_ramp = hard_mining, hard_mining_ramp
        self.hard_factor, self.map_size = hard_factor, map_size
        self.smoothing_kernel, self.sigma, self.top_fraction = smoothing_kernel, sigma, top_fraction
        self.compile, self.amp, self.checkpoint_every = compile, amp, checkpoint_every
        self._encoder: torch.nn.Module | None = None
        self._compiled: dict[str, Any] = {}

    @classmethod
    def validate_params(cls, params: dict[str, Any]) -> None:
        """The encoder and its weights known to timm (offline), layers that are blocks of it,
        two groups (even layers and decoder depth), heads dividing its width, warmup <=
        iterations, an odd smoothing kernel, ``narrow_lr`` only with a narrow bottleneck."""
        check_dinomaly(params, paper_encoder(params["variant"], params["inputs"]))

    @classmethod
    def resolve_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """The variant's and the inputs' values for the options left as None (the encoder is
        built on first use, so this is cheap)."""
        return cls(**params).get_params()

    # -- provenance --------------------------------------------------------------------------
    @classmethod
    def accepted_modalities(cls, params: dict[str, Any] | None = None) -> tuple[str, ...]:
        if params is None:
            return super().accepted_modalities()
        inputs = params.get("inputs", "rgb")
        if inputs not in INPUTS:
            raise ValueError(f"dinomaly inputs must be one of {INPUTS}, got {inputs!r}")
        return ("rgb+point_cloud",) if inputs == "rgb+depth" else ("image",)

    @classmethod
    def substitutes(cls, params: dict[str, Any]) -> list[str]:
        paper = paper_encoder(params.get("variant", "dinomaly"), params.get("inputs", "rgb"))
        encoder = params.get("encoder") or paper
        if encoder == SUBSTITUTE:
            return [f"encoder substitute {SUBSTITUTE} (ImageNet), not the paper's {paper}"]
        if params.get("weights") == "random":
            return [f"encoder {encoder} with random weights, not the paper's pretrained {paper}"]
        if encoder != paper:
            return [f"encoder {encoder}, not the paper's {paper}"]
        return []

    # -- modules -----------------------------------------------------------------------------
    @property
    def frozen_encoder(self) -> torch.nn.Module:
        """The frozen encoder (built on first use; never part of the fitted state)."""
        if self._encoder is None:
            self._encoder = create_encoder(
                self.encoder, self.weights, self.layers, self.encoder_depth
            ).to(self.device)
        return self._encoder

    def to(self, device):
        super().to(device)  # moves the frozen encoder too (``frozen``)
        self._compiled = {}
        return self

    def _run(self, name: str, module: torch.nn.Module, *args):
        if not self.compile:
            return module(*args)
        if name not in self._compiled:
            self._compiled[name] = torch.compile(module)
        return self._compiled[name](*args)

    def build(self, example: Batch) -> None:
        enc = self.frozen_encoder
        heads = self.decoder_heads or enc.num_heads
        self.decoder_ = Reconstructor(
            enc.embed_dim, heads, self.decoder_depth, self.dropout, self.narrow, self.attention_eps
        )

    def configure_optimizers(self):
        net = self.decoder_
        first = [net.bottleneck.reduce.weight, net.bottleneck.reduce.bias] if self.narrow else []
        ids = {id(p) for p in first}
        groups = [{"params": [p for p in net.parameters() if id(p) not in ids]}]
        if first:
            groups.append({"params": first, "lr": self.narrow_lr or self.lr})
        opt = StableAdamW(
            groups,
            lr=self.lr,
            betas=(0.9, 0.999),
            eps=self.eps,
            weight_decay=self.weight_decay,
            amsgrad=self.amsgrad,
            # Dinomaly2's StableAdamW skips a step whose gradients hold NaN or inf (Dinomaly's not)
            skip_nonfinite=self.variant == "dinomaly2",
        )
        final = None if self.lr_final is None else self.lr_final / self.lr
        dinomaly2 = self.variant == "dinomaly2"
        return opt, warm_cosine(opt, self.iterations, self.warmup, final, not dinomaly2)

    # -- features ----------------------------------------------------------------------------
    def _inputs(self, batch: Batch) -> torch.Tensor:
        """The images the encoder sees: [B, 3, H, W], or for ``rgb+depth`` the RGB images (no
        depth: 0) followed by the colourised depth maps, [2B, 3, H, W]."""
        if self.inputs == "rgb":
            return batch.image.to(self.device)
        if batch.xyz is None or batch.valid is None or (batch.rgb is None and batch.image is None):
            raise ValueError(
                "dinomaly inputs='rgb+depth' needs organised point clouds with RGB (MVTec 3D-AD "
                "layout: xyz, valid and rgb); this batch lacks some of them"
            )
        rgb = (batch.rgb if batch.rgb is not None else batch.image).to(self.device)
        z, valid = batch.xyz[:, 2].to(self.device), batch.valid.to(self.device)
        return torch.cat(rgb_and_depth(rgb, z, valid, self.depth_fill))

    def _features(self, batch: Batch):
        """Encoder layers (no gradient), decoder outputs, and both as two group maps."""
        with torch.no_grad():
            x = self._inputs(batch)
            layers, grid = self._run("encoder", self.frozen_encoder, normalize(x))
            if self.inputs == "rgb+depth":  # one doubled batch, fused per layer
                b, w = len(x) // 2, self.rgb_weight
                layers = [w * t[:b] + (1 - w) * t[b:] for t in layers]
        decoded = self._run("decoder", self.decoder_, layers)
        return self._groups(layers, grid, self.recentre), self._groups(decoded, grid, False)

    def _groups(
        self, layers: list[torch.Tensor], grid: tuple[int, int], recentre: bool
    ) -> list[torch.Tensor]:
        """Two groups (first and second half of ``layers``) averaged, prefix tokens dropped,
        as maps [B, C, h, w]. ``recentre`` (Dinomaly2, the encoder targets only, as the
        official code): each group's patch tokens minus its class token, then LayerNorm."""
        prefix = self.frozen_encoder.prefix
        half = len(layers) // 2
        out = []
        for group in (layers[:half], layers[half:]):
            tokens = torch.stack(group, 1).mean(1)
            patches = tokens[:, prefix:]
            if recentre:
                # the substitute has no class token: the image's mean token stands in
                context = tokens[:, :1] if prefix else patches.mean(1, keepdim=True)
                patches = F.layer_norm(patches - context, patches.shape[-1:], eps=1e-8)
            b, n, c = patches.shape
            out.append(patches.transpose(1, 2).reshape(b, c, *grid))
        return out

    # -- training ----------------------------------------------------------------------------
    def training_step(self, batch: Batch, step: int) -> torch.Tensor:
        target, output = self._features(batch)
        p = mining_fraction(step, self.hard_mining, self.hard_mining_ramp)
        return global_cosine_hard_mining(target, output, p, self.hard_factor)

    # -- scoring -----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch: Batch) -> Prediction:
        target, output = self._features(batch)
        size = None if self.map_size is None else (self.map_size, self.map_size)
        image = batch.image if batch.image is not None else batch.rgb
        maps = anomaly_maps(
            target, output, tuple(image.shape[-2:]), size, self.smoothing_kernel, self.sigma
        )
        return Prediction(score=top_mean(maps, self.top_fraction), anomaly_map=maps)
