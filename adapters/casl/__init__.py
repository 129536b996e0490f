"""``casl``: curvature-augmented self-supervised point reconstruction (Zha et al., AAAI 2026)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F

from bench.detector import FIT_SCOPES
from bench.params import Length, NonEmpty, ParamError, Range
from bench.registry import register_detector
from bench.training import TrainableDetector
from bench.types import Batch, Prediction

from ..common import gaussian_blur, grid_maps, point_clouds
from .network import CASLNet
from .sparse import voxelize
from .synthesis import median_spacing, normalise, prepared_inputs

#: the fixed seed of the subsample a test cloud larger than ``max_points`` is scored on
_TEST_SEED = 0
_Parts = Annotated[int, Range(ge=2)]
#: MinkUNet's four encoder or decoder widths, its eight block counts, a (low, high) range
_Widths = Annotated[tuple[Annotated[int, Range(ge=1)], ...], Length(4, 4)]
_Blocks = Annotated[tuple[Annotated[int, Range(ge=1)], ...], Length(8, 8)]
_LowHigh = Annotated[tuple[Annotated[float, Range(ge=0)], ...], Length(2, 2)]
#: PO3AD's voxel edge on clouds normalised to radius 1 (its clouds hold many points per voxel)
PAPER_VOXEL = 0.03
#: ``voxel_size="auto"``: the voxel edge in median nearest-neighbour distances, at least
AUTO_SPACINGS = 5.0
#: ``voxel_size="auto"``: at most this edge, so a cloud spans 32 voxels and the U-Net's
#: coarsest level (16 voxels wide) still holds several per cloud
AUTO_MAX_VOXEL = 1 / 16


@register_detector("casl")
class CASL(TrainableDetector):
    """Curvature-prompted masked reconstruction, then a per-point anomaly head (CASL).

    Each cloud is normalised (centroid at 0, farthest point at 1), voxelised at ``voxel_size``
    ("auto": PO3AD's 0.03, coarser for clouds too sparse for it) and described per point by its
    surface variation at the ``ks`` neighbourhood sizes (the ``curvature`` detector's quantity;
    ``neighbourhoods="density"`` counts them at the training clouds' point spacing, so a sparser
    or denser cloud gets neighbourhoods of the same area). The sparse U-Net (:class:`CASLNet`,
    MinkUNet34C widths by default) sees only the voxels' occupancy and the curvature prompts,
    never coordinates.

    Training, one run of ``pretrain_iterations + finetune_iterations`` optimiser steps (Adam
    without weight decay, PO3AD's cosine schedule per phase): first L1 + L2 reconstruction of
    every point's xyz on the normal clouds; then cross-entropy of the binary head on clouds that
    each carry one PO3AD pseudo-anomaly (``patch_parts``, ``displacement``). Training clouds are
    randomly rotated (``rotate="xyz"``, PO3AD's augmentation), thinned to 1 - U(0,
    ``density_jitter``) of their points and, with probability ``partial_views``, cut to a
    partial view. Point score = log(p_anomalous / p_normal); object score = mean of the top
    ``top_fraction`` of point scores. Organised clouds: scores go back to the grid (invalid points
    at the image's lowest score) and are smoothed (Gaussian ``sigma`` pixels). Clouds of more than
    ``max_points`` points are scored on a fixed random subsample of that size (training on a
    fresh one each step); every other point takes its nearest scored point's value.
    """

    modality = "point_cloud"
    also_accepts = ("points",)
    #: learns from whatever normal clouds it is given: every scope applies
    fit_scopes = FIT_SCOPES
    inference_amp = False  # covariance eigenvalues need full precision

    def __init__(
        self,
        voxel_size: Annotated[float, Range(gt=0)] | Literal["auto"] = "auto",
        ks: Annotated[tuple[Annotated[int, Range(ge=3)], ...], NonEmpty] = (16, 32, 64),
        encoder_channels: _Widths = (32, 64, 128, 256),
        decoder_channels: _Widths = (256, 128, 96, 96),
        layers: _Blocks = (2, 3, 4, 6, 2, 2, 2, 2),
        stem_channels: Annotated[int, Range(ge=1)] = 32,
        stem_kernel: Annotated[int, Range(ge=1)] = 5,
        pretrain_iterations: Annotated[int, Range(ge=0)] = 4000,
        finetune_iterations: Annotated[int, Range(ge=1)] = 4000,
        lr: Annotated[float, Range(gt=0)] = 1e-3,
        weight_decay: Annotated[float, Range(ge=0)] = 0.0,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        patch_parts: _Parts | Annotated[tuple[_Parts, ...], Length(2, 2)] = (8, 64),
        displacement: _LowHigh = (0.06, 0.12),
        rotate: Literal["xyz", "none"] = "xyz",
        partial_views: Annotated[float, Range(ge=0, le=1)] = 0.0,
        density_jitter: Annotated[float, Range(ge=0, lt=1)] = 0.5,
        neighbourhoods: Literal["density", "count"] = "density",
        max_points: Annotated[int, Range(ge=16)] = 40000,
        top_fraction: Annotated[float, Range(gt=0, le=1)] = 0.01,
        sigma: Annotated[float, Range(ge=0)] = 4.0,
        knn: Literal["auto", "kdtree", "torch"] = "auto",
        amp: Literal["auto", "bf16", "fp16", "off"] = "auto",
        grad_clip: Annotated[float, Range(ge=0)] | None = None,
        checkpoint_every: Annotated[int, Range(ge=1)] = 500,
    ) -> None:
        if len(displacement) != 2 or displacement[0] > displacement[1]:
            raise ValueError(f"displacement must be (low, high), got {displacement!r}")
        if isinstance(patch_parts, (tuple, list)):
            if len(patch_parts) != 2 or patch_parts[0] > patch_parts[1]:
                raise ValueError(f"patch_parts must be an int or (low, high), got {patch_parts!r}")
            patch_parts = tuple(patch_parts)
        self.voxel_size, self.ks = voxel_size, tuple(ks)
        self.encoder_channels, self.decoder_channels = (
            tuple(encoder_channels),
            tuple(decoder_channels),
        )
        self.layers, self.stem_channels, self.stem_kernel = (
            tuple(layers),
            stem_channels,
            stem_kernel,
        )
        self.pretrain_iterations, self.finetune_iterations = (
            pretrain_iterations,
            finetune_iterations,
        )
        self.iterations = pretrain_iterations + finetune_iterations
        self.lr, self.weight_decay, self.lr_schedule = lr, weight_decay, lr_schedule
        self.patch_parts, self.displacement = patch_parts, tuple(displacement)
        self.rotate, self.max_points, self.top_fraction = rotate, max_points, top_fraction
        self.partial_views, self.density_jitter = partial_views, density_jitter
        self.neighbourhoods = neighbourhoods
        self.sigma, self.knn = sigma, knn
        self.amp, self.grad_clip, self.checkpoint_every = amp, grad_clip, checkpoint_every

    @classmethod
    def validate_params(cls, params: dict[str, Any]) -> None:
        """The (low, high) ranges ``displacement`` and ``patch_parts`` in order (their lengths,
        like those of ``ks`` and the network's widths, are in the type hints)."""
        for name in ("displacement", "patch_parts"):
            value = params[name]
            if isinstance(value, (tuple, list)) and len(value) == 2 and value[0] > value[1]:
                raise ParamError.bad(name, value, "must be (low, high) with low <= high")

    # -- inputs ------------------------------------------------------------------------------
    def _subsample(self, n: int, generator: torch.Generator) -> torch.Tensor | None:
        if n <= self.max_points:
            return None
        return torch.randperm(n, generator=generator)[: self.max_points].to(self.device)

    def _spacing(self, example: Batch) -> float | None:
        """Median nearest-neighbour distance of the example's (the first training batch's)
        normalised, subsampled clouds."""
        generator = torch.Generator().manual_seed(_TEST_SEED)
        spacings = []
        for points in point_clouds(example, self.device):
            if len(points) >= 2:
                keep = self._subsample(len(points), generator)
                p = normalise((points if keep is None else points[keep]).float())
                spacings.append(median_spacing(p, self.knn))
        return float(torch.tensor(spacings).median()) if spacings else None

    def _voxel_size(self, spacing: float | None) -> float:
        """``voxel_size``, or for "auto" PO3AD's 0.03 unless the clouds are too sparse for it:
        ``AUTO_SPACINGS`` median nearest-neighbour distances of the training clouds (so that an
        occupied voxel holds a few points), at most ``AUTO_MAX_VOXEL``."""
        if self.voxel_size != "auto":
            return float(self.voxel_size)
        if spacing is None:
            return PAPER_VOXEL
        return min(max(PAPER_VOXEL, AUTO_SPACINGS * spacing), AUTO_MAX_VOXEL)

    def _reference_spacing(self) -> float | None:
        """The spacing the ``ks`` are counted at (None: plain counts)."""
        return getattr(self, "spacing_", None) if self.neighbourhoods == "density" else None

    # -- training ----------------------------------------------------------------------------
    def build(self, example: Batch) -> None:
        self.spacing_ = self._spacing(example)
        self.voxel_size_ = self._voxel_size(self.spacing_)
        self.net_ = CASLNet(
            len(self.ks),
            self.encoder_channels,
            self.decoder_channels,
            self.layers,
            self.stem_channels,
            self.stem_kernel,
        )

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, object]:
        opt = torch.optim.Adam(self.net_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_schedule == "constant":
            return opt, None
        phases = (self.pretrain_iterations, self.finetune_iterations)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: po3ad_lr_factor(s, *phases))

    def training_step(self, batch: Batch, step: int) -> torch.Tensor:
        finetune = step >= self.pretrain_iterations
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        # geometry (rotation, kNN, covariances) in full precision even under the fit's autocast
        with torch.autocast(self.device.type, enabled=False):
            clouds, features, labels = [], [], []
            for points in point_clouds(batch, self.device):
                if not len(points):
                    continue  # a scan without valid points teaches nothing
                keep = self._subsample(len(points), generator)
                if keep is None:
                    keep = torch.arange(len(points), device=self.device)
                if self.density_jitter:  # a sparser scan: keep 1 - U(0, jitter) of the points
                    fraction = 1 - self.density_jitter * float(torch.rand((), generator=generator))
                    order = torch.randperm(len(keep), generator=generator).to(self.device)
                    keep = keep[order[: max(3, round(len(keep) * fraction))]]
                p, curv, lab = prepared_inputs(
                    points[keep],
                    self.ks,
                    self.knn,
                    generator,
                    rotate=self.rotate == "xyz",
                    synthesize_anomaly=finetune,
                    parts=self.patch_parts,
                    magnitude=self.displacement,
                    partial=self.partial_views,
                    spacing=self._reference_spacing(),
                )
                clouds.append(p)
                features.append(curv)
                labels.append(lab)
            if not clouds:
                raise ValueError("casl: a training batch holds no valid points")
            coords, point_voxel = voxelize(clouds, self.voxel_size_)
        xyz, logits = self.net_(coords, point_voxel, torch.cat(features))
        if finetune:
            return F.cross_entropy(logits.float(), torch.cat(labels))
        target = torch.cat(clouds)
        error = xyz.float() - target
        return error.abs().mean() + (error**2).mean()

    # -- scoring -----------------------------------------------------------------------------
    @torch.no_grad()
    def point_scores(self, clouds: list[torch.Tensor]) -> list[torch.Tensor]:
        """log(p_anomalous / p_normal) for every point of each cloud (empty clouds: empty)."""
        scored = [i for i, points in enumerate(clouds) if len(points)]
        out = [torch.zeros(0, device=self.device) for _ in clouds]
        if not scored:
            return out
        prepared, features, kept = [], [], []
        for i in scored:
            points = clouds[i]
            # a fixed subsample per cloud, whatever else is in the batch
            keep = self._subsample(len(points), torch.Generator().manual_seed(_TEST_SEED))
            p, curv, _ = prepared_inputs(
                points if keep is None else points[keep],
                self.ks,
                self.knn,
                spacing=self._reference_spacing(),
            )
            prepared.append(p)
            features.append(curv)
            kept.append(keep)
        coords, point_voxel = voxelize(prepared, self.voxel_size_)
        _, logits = self.net_(coords, point_voxel, torch.cat(features))
        scores = (logits[:, 1] - logits[:, 0]).float().split([len(p) for p in prepared])
        for i, keep, score in zip(scored, kept, scores):
            if keep is not None:  # every point takes its nearest scored point's value
                score = score[_nearest(clouds[i], clouds[i][keep], self.knn)]
            out[i] = score
        return out

    def _object_score(self, scores: torch.Tensor) -> torch.Tensor:
        if not scores.numel():
            return torch.zeros((), device=scores.device)
        k = max(1, round(len(scores) * self.top_fraction))
        return scores.topk(min(k, len(scores))).values.mean()

    @torch.no_grad()
    def predict(self, batch: Batch) -> Prediction:
        clouds = point_clouds(batch, self.device)
        scores = self.point_scores(clouds)
        objects = torch.stack([self._object_score(s) for s in scores])
        if batch.points is not None:
            return Prediction(score=objects, point_scores=scores)
        maps = grid_maps(scores, batch.valid.to(self.device))
        return Prediction(score=objects, anomaly_map=gaussian_blur(maps, self.sigma))


def po3ad_lr_factor(step: int, pretrain: int, finetune: int) -> float:
    """PO3AD's schedule as a factor of the base learning rate, per phase (pretraining, then
    fine-tuning): constant for the first 1% of the phase's steps (PO3AD: 10 of 1,001 epochs),
    then cosine down to 1e-3 of the base (PO3AD: 1e-3 to 1e-6)."""
    start, length = (0, pretrain) if step < pretrain else (pretrain, finetune)
    hold = length // 100
    t = (step - start - hold) / max(1, length - hold)
    if t <= 0:
        return 1.0
    return 1e-3 + 0.5 * (1 - 1e-3) * (1 + math.cos(math.pi * min(t, 1.0)))


def _nearest(points: torch.Tensor, reference: torch.Tensor, method: str) -> torch.Tensor:
    """Row of ``reference`` nearest to each of ``points`` [N, 3]."""
    if method == "torch" or (method == "auto" and points.device.type != "cpu"):
        return torch.cat([torch.cdist(chunk, reference).argmin(1) for chunk in points.split(4096)])
    from scipy.spatial import cKDTree

    _, idx = cKDTree(reference.double().cpu().numpy()).query(
        points.double().cpu().numpy(), k=1, workers=-1
    )
    return torch.from_numpy(idx.astype("int64")).to(points.device)
