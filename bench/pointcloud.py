"""Point-cloud geometry shared by the 3D detectors: exact k-nearest neighbours and the surface
variation of each point's neighbourhood, batched in torch (GPU when the points are there)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def knn_indices(
    points: torch.Tensor, k: int, method: str = "auto", max_pairs: int = 1 << 25
) -> torch.Tensor:
    """Indices [N, k] of each point's k nearest points of the same cloud [N, 3], itself included
    (first). ``method``: "torch" (exact distances for blocks of rows, at most ``max_pairs`` at a
    time: the GPU path), "kdtree" (SciPy's KD-tree on all CPU cores), "auto" (by device)."""
    n = points.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"k must be in 1..{n} (the number of points), got {k}")
    if method == "auto":
        method = "kdtree" if points.device.type == "cpu" else "torch"
    if method == "kdtree":
        from scipy.spatial import cKDTree

        p = points.detach().double().cpu().numpy()
        _, idx = cKDTree(p).query(p, k=k, workers=-1)
        return torch.from_numpy(idx.reshape(n, k).astype("int64")).to(points.device)
    if method != "torch":
        raise ValueError(f"knn method must be auto, torch or kdtree, got {method!r}")
    p = points.double() if points.device.type == "cpu" else points.float()
    sq = (p * p).sum(1)
    rows = max(1, max_pairs // n)
    out = torch.empty(n, k, dtype=torch.long, device=points.device)
    for r in range(0, n, rows):
        q = p[r : r + rows]
        d = torch.addmm(sq, q, p.T, alpha=-2).add_(sq[r : r + rows, None])
        d[torch.arange(len(q), device=p.device), torch.arange(r, r + len(q), device=p.device)] = -1
        out[r : r + rows] = d.topk(k, dim=1, largest=False, sorted=True).indices
    return out


def surface_variation(points: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """l0 / (l0 + l1 + l2) of the covariance of each point's neighbours [N, k] (eigenvalues
    ascending), in [0, 1/3]; float64 on the CPU, float32 on a GPU."""
    dtype = torch.float64 if points.device.type == "cpu" else torch.float32
    nb = points.to(dtype)[neighbours]  # [N, k, 3]
    centred = nb - nb.mean(1, keepdim=True)
    cov = centred.transpose(1, 2) @ centred / neighbours.shape[1]
    eig = torch.linalg.eigvalsh(cov).clamp_min(0)
    return (eig[:, 0] / eig.sum(1).clamp_min(torch.finfo(dtype).tiny)).float()


def multiscale_surface_variation(
    points: torch.Tensor,
    ks: Sequence[int] = (16, 32, 64),
    method: str = "auto",
    neighbours: torch.Tensor | None = None,
) -> torch.Tensor:
    """Surface variation at each scale: [len(ks), N] for a cloud [N, 3] (one kNN search, or
    ``neighbours`` [N, >= max k] from :func:`knn_indices` when the caller already has them)."""
    ks = [min(k, points.shape[0]) for k in ks]
    if neighbours is None:
        neighbours = knn_indices(points, max(ks), method)
    return torch.stack([surface_variation(points, neighbours[:, :k]) for k in ks])


def open3d_surface_variation(points, ks: Sequence[int] = (16, 32, 64)):
    """The same quantity from open3d's KD-tree kNN covariances (CPU reference)."""
    import numpy as np
    import open3d as o3d

    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(points, np.float64)))
    out = []
    for k in ks:
        cov = np.asarray(
            o3d.geometry.PointCloud.estimate_point_covariances(
                cloud, o3d.geometry.KDTreeSearchParamKNN(knn=k)
            )
        )
        eig = np.clip(np.linalg.eigvalsh(cov), 0, None)
        out.append(eig[:, 0] / np.maximum(eig.sum(1), np.finfo(np.float64).tiny))
    return np.stack(out)
