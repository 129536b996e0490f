"""Anomaly-type discovery after detection (AnomalyNCD's idea): which defects look alike?

For each defective test image the anomaly map is binarised by AnomalyNCD's main-element
binarisation, the anomalous region is described by the detector's own features, the regions are
clustered into anomaly types, and the clustering is scored against the defect-type folders with
NMI, ARI and F1 (clusters matched to types by the Hungarian algorithm).

Main-element binarisation (MEBin, as in the official AnomalyNCD code): each map is mapped to
0..255 by the range [lowest, highest] of the per-image maxima of the maps being clustered (scores
below the lowest maximum become 0); thresholds sweep downward (255, 251, ...); at each, the map
``> threshold`` is eroded (``erosion`` x ``erosion``) and its 8-connected components counted;
the threshold is the last one of the longest run (at least ``min_run`` steps) of one non-zero
count, where the count has settled; the mask is the eroded binary map there (empty when no run
exists). The paper embeds the regions with a DINO ViT trained with mask-guided attention; here
the detector's frozen backbone features are averaged over the mask.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
from sklearn.metrics.cluster import contingency_matrix

_EIGHT = np.ones((3, 3), dtype=bool)


def main_element_threshold(
    map255: np.ndarray, step: int = 4, erosion: int = 6, min_run: int = 4
) -> int | None:
    """The threshold (0..255) ending the longest stable run of component counts, or None."""
    structure = np.ones((erosion, erosion), dtype=bool)
    counts = [
        ndimage.label(ndimage.binary_erosion(map255 > t, structure), _EIGHT)[1]
        for t in range(255, 0, -step)
    ]
    best = None  # (length, end index)
    start = 0
    for i in range(1, len(counts) + 1):
        if i == len(counts) or counts[i] != counts[start]:
            length = i - start
            if counts[start] and length >= min_run and (best is None or length > best[0]):
                best = (length, i - 1)
            start = i
    return None if best is None else 255 - best[1] * step


def main_element_masks(
    maps: torch.Tensor, step: int = 4, erosion: int = 6, min_run: int = 4
) -> torch.Tensor:
    """Binary masks [N,H,W] of the main anomalous elements of maps [N,H,W] (MEBin)."""
    peaks = maps.flatten(1).amax(1)
    lo, hi = float(peaks.min()), float(peaks.max())
    structure = np.ones((erosion, erosion), dtype=bool)
    out = np.zeros(maps.shape, dtype=bool)
    for i, m in enumerate(maps.double().cpu().numpy()):
        if hi > lo:
            m255 = np.where(m < lo, 0.0, (m - lo) / (hi - lo) * 255)
        else:  # every map peaks at the same score
            m255 = np.where(m < lo, 0.0, 255.0)
        t = main_element_threshold(m255, step, erosion, min_run)
        if t is not None:
            out[i] = ndimage.binary_erosion(m255 > t, structure)
    return torch.from_numpy(out)


def cluster_f1(true: np.ndarray, pred: np.ndarray) -> float:
    """Macro F1 over the true types after matching clusters to types one to one (Hungarian);
    a type left without a cluster scores 0."""
    overlap = contingency_matrix(true, pred)  # types x clusters
    rows, cols = linear_sum_assignment(-overlap)
    f1 = np.zeros(overlap.shape[0])
    tp = overlap[rows, cols]
    f1[rows] = 2 * tp / (overlap.sum(1)[rows] + overlap.sum(0)[cols])
    return float(f1.mean())


def estimate_types(embeddings: np.ndarray, seed: int, max_types: int = 10) -> int:
    """Number of clusters with the best silhouette (2..max_types)."""
    best, best_k = -1.0, 2
    distinct = len(np.unique(embeddings.round(6), axis=0))
    for k in range(2, min(max_types, distinct, len(embeddings) - 1) + 1):
        labels = KMeans(k, n_init=10, random_state=seed).fit_predict(embeddings)
        score = silhouette_score(embeddings, labels)
        if score > best:
            best, best_k = score, k
    return best_k


def discover_types(
    images: torch.Tensor,
    maps: torch.Tensor,
    defects: list[str],
    describe: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    n_types: int | None = None,
    seed: int = 0,
) -> dict:
    """Clusters the defective images ``images`` [N,3,H,W] by the regions their ``maps``
    [N,H,W] point at; ``describe(images, masks)`` returns one embedding per image. ``n_types``
    None uses the number of defect types present (as AnomalyNCD assumes), 0 estimates it."""
    if len(defects) < 3 or len(set(defects)) < 2:
        return {"n_images": len(defects), "note": "needs >= 3 defective images of >= 2 types"}
    masks = main_element_masks(maps)
    emb = describe(images, masks).double()
    emb = torch.nn.functional.normalize(emb, dim=1).cpu().numpy()
    k = len(set(defects)) if n_types is None else n_types or estimate_types(emb, seed)
    pred = KMeans(k, n_init=10, random_state=seed).fit_predict(emb)
    true = np.unique(np.asarray(defects), return_inverse=True)[1]
    return {
        "n_images": len(defects),
        "n_types_true": len(set(defects)),
        "n_types": int(k),
        "nmi": float(normalized_mutual_info_score(true, pred)),
        "ari": float(adjusted_rand_score(true, pred)),
        "f1": cluster_f1(true, pred),
        "mask_fraction": float(masks.float().mean()),
        # per defective image, in test order: its defect folder and the cluster it was put in
        "defects": list(defects),
        "clusters": [int(c) for c in pred],
    }
