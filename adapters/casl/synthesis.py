"""Geometry of CASL's inputs: normalisation, curvature features, normals and PO3AD's
normal-guided pseudo-anomalies."""

from __future__ import annotations

import math

import torch

from bench.pointcloud import knn_indices, multiscale_surface_variation


def normalise(points: torch.Tensor) -> torch.Tensor:
    """Centroid to the origin and the farthest point at distance 1 (PO3AD's NormalizeCoord)."""
    centred = points - points.mean(0)
    return centred / centred.norm(dim=1).max().clamp_min(1e-12)


def random_rotation(generator: torch.Generator) -> torch.Tensor:
    """PO3AD's augmentation: rotations about z, then y, then x, each uniform in [-pi, pi)."""
    out = torch.eye(3, dtype=torch.float64)
    for axis in (2, 1, 0):
        angle = (torch.rand((), generator=generator, dtype=torch.float64) * 2 - 1) * math.pi
        c, s = torch.cos(angle), torch.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        r = torch.eye(3, dtype=torch.float64)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        if axis == 1:  # the y rotation's sign convention
            r[i, j], r[j, i] = s, -s
        out = r @ out
    return out.float()


def curvature_features(
    points: torch.Tensor, ks: tuple[int, ...], neighbours: torch.Tensor | None = None
) -> torch.Tensor:
    """Surface variation at each scale, times 3 (so in [0, 1]): [N, len(ks)]."""
    if len(points) < 3:
        return torch.zeros(len(points), len(ks), device=points.device)
    return (multiscale_surface_variation(points, ks, neighbours=neighbours) * 3).T


def estimate_normals(points: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """Unit normals [N, 3]: the eigenvector of the smallest eigenvalue of each point's
    neighbourhood covariance (sign arbitrary)."""
    nb = points.double()[neighbours]
    centred = nb - nb.mean(1, keepdim=True)
    cov = centred.transpose(1, 2) @ centred
    return torch.linalg.eigh(cov).eigenvectors[:, :, 0].to(points.dtype)


def synthesize(
    points: torch.Tensor,
    normals: torch.Tensor,
    generator: torch.Generator,
    parts: int | tuple[int, int] = 64,
    magnitude: tuple[float, float] = (0.06, 0.12),
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pseudo-anomaly (PO3AD's normal-guided synthesis) on a normalised cloud [N, 3].

    A random centre point and its N // ``parts`` nearest points form the patch (a sphere crop by
    point count; ``parts`` = (low, high) draws it log-uniformly in that range per patch); each patch point moves along its normal by m * ramp * sign with m uniform in
    ``magnitude``, sign +-1 for the whole patch and ramp = 1 - d / d_max min-max scaled to
    [0, 1] (1 at the centre, 0 at the farthest patch point). Normals are oriented to agree with
    the centre's normal, so the patch bulges or sinks as one smooth surface (PO3AD moves along
    the normals' absolute values instead). Returns the moved cloud and per-point labels (1 in
    the patch).
    """
    n = len(points)
    if isinstance(parts, tuple):
        lo, hi = parts
        u = float(torch.rand((), generator=generator))
        size = max(1, int(n / math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))))
    else:
        size = max(1, n // parts)
    centre = int(torch.randint(n, (), generator=generator))
    distance = (points - points[centre]).norm(dim=1)
    patch = distance.topk(size, largest=False).indices
    d = distance[patch]
    ramp = 1 - d / d.max().clamp_min(1e-12)
    span = ramp.max() - ramp.min()
    ramp = (ramp - ramp.min()) / span if span > 0 else torch.ones_like(ramp)
    lo, hi = magnitude
    m = lo + (hi - lo) * float(torch.rand((), generator=generator))
    sign = 1.0 if float(torch.rand((), generator=generator)) < 0.5 else -1.0
    direction = normals[patch]
    direction = direction * torch.where((direction @ normals[centre]) < 0, -1.0, 1.0)[:, None]
    moved = points.clone()
    moved[patch] += direction * (m * sign * ramp)[:, None]
    labels = torch.zeros(n, dtype=torch.long, device=points.device)
    labels[patch] = 1
    return moved, labels


def median_spacing(points: torch.Tensor, knn: str = "auto") -> float:
    """Median distance from each point to its nearest other point."""
    nearest = knn_indices(points, 2, knn)[:, 1]
    return float((points - points[nearest]).norm(dim=1).median())


def density_scaled(
    ks: tuple[int, ...], points: torch.Tensor, reference: float, knn: str = "auto"
) -> tuple[int, ...]:
    """``ks`` counted at point spacing ``reference``, rescaled to this cloud's spacing so that
    each neighbourhood covers the same area: k * (reference / spacing)^2, within [3, 4k]."""
    ratio = (reference / max(median_spacing(points, knn), 1e-12)) ** 2
    return tuple(min(max(3, round(k * ratio)), 4 * k, len(points)) for k in ks)


def partial_view(points: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The points on one side of a random plane, 50-95% of them: a scan that saw part of the
    object (Real3D-AD's test clouds are single views, its training templates complete)."""
    direction = torch.randn(3, generator=generator, dtype=torch.float64)
    along = points.double() @ (direction / direction.norm()).to(points.device)
    keep = 0.5 + 0.45 * float(torch.rand((), generator=generator))
    return points[along <= torch.quantile(along, keep)]


def prepared_inputs(
    points: torch.Tensor,
    ks: tuple[int, ...],
    knn: str = "auto",
    generator: torch.Generator | None = None,
    rotate: bool = False,
    synthesize_anomaly: bool = False,
    parts: int | tuple[int, int] = 64,
    magnitude: tuple[float, float] = (0.06, 0.12),
    normal_k: int = 16,
    partial: float = 0.0,
    spacing: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A cloud as the network sees it: normalised (optionally rotated, with probability
    ``partial`` cut to a partial view, optionally with one pseudo-anomaly), its curvature
    features and its point labels (all 0 without synthesis). With ``spacing``, the ``ks`` are
    neighbour counts at that point spacing, rescaled to the cloud's own
    (:func:`density_scaled`)."""
    # full precision even inside the fit's autocast (kNN distances, covariances, rotation)
    with torch.autocast(points.device.type, enabled=False):
        p = normalise(points.float())
        if rotate:
            assert generator is not None
            p = p @ random_rotation(generator).to(p.device).T
        if partial and float(torch.rand((), generator=generator)) < partial:
            p = normalise(partial_view(p, generator))
        labels = torch.zeros(len(p), dtype=torch.long, device=p.device)
        if spacing is not None and len(p) >= 3:
            ks = density_scaled(ks, p, spacing, knn)
        k = min(max(ks), len(p))
        neighbours = knn_indices(p, k, knn) if len(p) >= 3 else None
        if synthesize_anomaly and len(p) >= 3:
            assert generator is not None
            normals = estimate_normals(p, neighbours[:, : min(normal_k, k)])
            p, labels = synthesize(p, normals, generator, parts, magnitude)
            neighbours = knn_indices(p, k, knn)
        return p, curvature_features(p, ks, neighbours), labels
