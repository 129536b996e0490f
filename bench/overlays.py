"""A grid of anomaly-map overlays on the best and worst scored test images of a job; for
unorganised clouds, each cloud's points projected on its two main axes, coloured by score."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from bench.metrics import evenly_spaced

THUMB = 160
THUMB_POINTS = 4000  # points kept per cloud for its panel
#: items of a test split that are predicted but not scored (MVTec AD 2's validation images,
#: which set the threshold, and its private sets): left out of the figure
UNSCORED_ROLES = ("validation", "test_private", "test_private_mixed")


def _projected(points: torch.Tensor) -> torch.Tensor:
    """[N,2] coordinates of a cloud on its two principal axes (an even subsample if large)."""
    points = points.float().cpu()
    if len(points) > THUMB_POINTS:
        points = points[evenly_spaced(len(points), THUMB_POINTS)]
    centred = points - points.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:2].T


class OverlayCollector:
    """Keeps a small thumbnail of every test image and its map, or of every cloud and its point
    scores (``update`` per batch)."""

    def __init__(self) -> None:
        self.images, self.maps, self.scores, self.labels, self.names = [], [], [], [], []
        self.clouds: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def update(self, prediction, batch) -> None:
        if batch.points is not None and prediction.point_scores is not None:
            for points, scores, labels in zip(
                batch.points, prediction.point_scores, batch.point_labels
            ):
                keep = evenly_spaced(len(points), THUMB_POINTS)
                self.clouds.append(
                    (
                        _projected(points[keep.to(points.device)]),
                        scores.float().cpu()[keep],
                        labels.cpu()[keep],
                    )
                )
            self._add_names(prediction, batch)
            return
        image = batch.image if batch.image is not None else batch.rgb
        if image is None:
            return
        keep = [i for i, m in enumerate(batch.meta) if m.get("role") not in UNSCORED_ROLES]
        if not keep:
            return
        size = (THUMB, THUMB)
        self.images.append(F.interpolate(image[keep].float().cpu(), size=size, mode="area"))
        amap = prediction.anomaly_map[keep].float().cpu()[:, None]
        self.maps.append(F.interpolate(amap, size=size, mode="bilinear", align_corners=False)[:, 0])
        self._add_names(prediction, batch, keep)

    def _add_names(self, prediction, batch, keep: list[int] | None = None) -> None:
        keep = list(range(len(batch.meta))) if keep is None else keep
        self.scores += prediction.score.float().cpu()[keep].tolist()
        self.labels += batch.label.cpu()[keep].tolist()
        self.names += [
            f"{batch.meta[i]['defect']}/{Path(batch.meta[i]['path']).stem}" for i in keep
        ]

    def picks(self, per_row: int = 4) -> list[tuple[str, list[int]]]:
        """Rows of image indices: the most confidently right and the most wrong."""
        s = torch.tensor(self.scores)
        y = torch.tensor(self.labels)
        # margin > 0 when right: defective above the good images' median, good below the
        # defective images' median
        good, bad = s[y == 0], s[y == 1]
        if len(good) == 0 or len(bad) == 0:
            order = s.argsort(descending=True).tolist()
            return [("highest scores", order[:per_row]), ("lowest scores", order[-per_row:])]
        margin = torch.where(y == 1, s - good.median(), bad.median() - s)
        order = margin.argsort().tolist()
        return [
            ("best (most confidently right)", order[::-1][:per_row]),
            ("worst", order[:per_row]),
        ]

    def save(self, path: Path, title: str) -> Path | None:
        if not self.images and not self.clouds:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if self.clouds:  # a robust colour range: single extreme points would wash it out
            every = torch.cat([s for _, s, _ in self.clouds])
            lo, hi = (float(q) for q in torch.quantile(every, torch.tensor([0.01, 0.999])))
        else:
            images, maps = torch.cat(self.images), torch.cat(self.maps)
            lo, hi = float(maps.min()), float(maps.max())
        rows = self.picks()
        cols = max(len(r[1]) for r in rows)
        fig, axes = plt.subplots(
            len(rows), cols, figsize=(2.4 * cols, 2.9 * len(rows)), squeeze=False
        )
        for r, (label, idx) in enumerate(rows):
            for c in range(cols):
                ax = axes[r, c]
                ax.axis("off")
                if c >= len(idx):
                    continue
                i = idx[c]
                if self.clouds:
                    xy, s, y = self.clouds[i]
                    order = s.argsort()  # high scores drawn last, on top
                    xy, s, y = xy[order], s[order], y[order]
                    ax.scatter(*xy.T, c=s, cmap="jet", vmin=lo, vmax=hi, s=1.5, linewidths=0)
                    if y.any():  # ground-truth defect points outlined
                        ax.scatter(*xy[y].T, s=6, facecolors="none", edgecolors="k", lw=0.3)
                    ax.set_aspect("equal")
                else:
                    ax.imshow(images[i].permute(1, 2, 0).clamp(0, 1).numpy())
                    ax.imshow(maps[i].numpy(), cmap="jet", alpha=0.45, vmin=lo, vmax=hi)
                ax.set_title(f"{self.names[i]}\nscore {self.scores[i]:.3g}", fontsize=7)
            axes[r, 0].text(
                -0.1,
                0.5,
                label,
                transform=axes[r, 0].transAxes,
                rotation=90,
                va="center",
                ha="right",
                fontsize=8,
            )
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path
