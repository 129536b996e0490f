"""The image grid of the HTML report (:mod:`bench.report_html`): per category the same test
images for every detector, each a small JPEG data: URI (test image, its mask outline, each
detector's anomaly-map thumbnail from the job's ``per_image`` file)."""

from __future__ import annotations

import base64
import io
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from PIL import Image, UnidentifiedImageError
from scipy.ndimage import binary_erosion

from bench.intervals import load_per_image

#: the hardest anomalous images of the category's best detector, then seeded random ones
N_HARD, N_RANDOM, SEED = 3, 2, 0
SIZE = 96  # the per-image files' thumbnail size
#: a perceptually uniform colour map for the anomaly maps (low: black, high: pale yellow)
LUT = (colormaps["inferno"](np.arange(256))[:, :3] * 255).astype(np.uint8)
GREY = np.full((SIZE, SIZE, 3), 160, np.uint8)


def data_uri(rgb: np.ndarray) -> str:
    """A JPEG data: URI (quality 85: a 96 px thumbnail is 2-4 kB)."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def read_thumb(path: Path) -> np.ndarray | None:
    """The test image area-resized to the thumbnails' square, as RGB uint8 (16-bit and float
    images stretched to their range); None when it cannot be read."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I", "I;16", "I;16B", "F"):
                a = np.asarray(image, dtype=np.float64)
                lo, hi = np.nanmin(a), np.nanmax(a)
                a = np.nan_to_num((a - lo) / max(hi - lo, 1e-12) * 255)
                image = Image.fromarray(a.astype(np.uint8))
            image = image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BOX)
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return np.asarray(image)


def number(x: float) -> str:
    """A score in at most 4-5 characters of digits, never in exponent notation above 1."""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def stretched(thumbs: np.ndarray) -> np.ndarray:
    """A job's thumbnails on one colour scale from their 1st to their 99.9th percentile: one
    extreme image would otherwise leave every other map of the job near black."""
    lo, hi = np.percentile(thumbs, [1, 99.9])
    scaled = (thumbs.astype(np.float32) - lo) / max(hi - lo, 1.0) * 255
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def outlined(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """``rgb`` with the boundary pixels of ``mask`` painted ``colour``."""
    edge = mask & ~binary_erosion(mask, border_value=0)
    out = rgb.copy()
    out[edge] = colour
    return out


def pick(per_best: Any, ids: list[str], category: str) -> list[tuple[str, str]]:
    """(id, why) of the rows: the best detector's lowest-scored anomalous images (its misses),
    then random images of the rest (seeded by SEED and the category's name)."""
    at = {i: k for k, i in enumerate(per_best.ids.tolist())}
    anomalous = [i for i in ids if per_best.labels[at[i]] == 1]
    hardest = sorted(anomalous, key=lambda i: per_best.scores[at[i]])[:N_HARD]
    rest = [i for i in ids if i not in hardest]
    n = min(N_RANDOM, len(rest))
    rng = np.random.default_rng([SEED, zlib.crc32(category.encode())])
    chosen = rng.choice(len(rest), size=n, replace=False)
    return [(i, "hardest") for i in hardest] + [(rest[k], "random") for k in sorted(chosen)]


def category_rows(
    root: Path, category: str, rows: dict[str, dict[str, Any]], scored: pd.Series
) -> dict[str, Any] | None:
    """One category: ``rows`` maps each label to its record, ``scored`` each label to the
    value the best detector is chosen by. None when no job has map thumbnails."""
    per = {label: load_per_image(root, rows[label]) for label in sorted(rows)}
    per = {k: p for k, p in per.items() if p is not None and getattr(p, "thumbs", None) is not None}
    if not per:
        return None
    best = max(per, key=lambda k: np.nan_to_num(scored.get(k, np.nan), nan=-np.inf))
    shared = set.intersection(*(set(p.ids.tolist()) for p in per.values()))
    ids = [i for i in per[best].ids.tolist() if i in shared]
    record = rows[best]
    lines = []
    at = {label: {i: k for k, i in enumerate(p.ids.tolist())} for label, p in per.items()}
    shown = {label: stretched(p.thumbs) for label, p in per.items()}
    for image_id, why in pick(per[best], ids, category):
        k = at[best][image_id]
        mask = per[best].mask_thumbs[k].astype(bool)
        path = Path(record.get("root") or "") / str(per[best].paths[k])
        rgb = read_thumb(path)
        maps = []
        for label, p in per.items():
            j = at[label][image_id]
            heat = outlined(LUT[shown[label][j]], mask, (0, 255, 255))
            maps.append(dict(label=label, uri=data_uri(heat), score=number(p.scores[j])))
        lines.append(
            dict(id=image_id, why=why, anomalous=bool(per[best].labels[k]), path=str(path),
                 image=None if rgb is None else data_uri(rgb),
                 outline=data_uri(outlined(GREY if rgb is None else rgb, mask, (255, 0, 0))),
                 maps=maps)
        )  # fmt: skip
    return dict(best=best, labels=list(per), rows=lines)


def image_rows(
    root: Path, replicates: dict[str, dict[str, dict[str, Any]]], cells: pd.DataFrame
) -> dict[str, dict[str, Any]]:
    """Per category (that has thumbnails) its image rows; ``cells``: the metric (index label,
    column) that picks each category's best detector."""
    out = {}
    for category, rows in replicates.items():
        scored = cells.xs(category, level="column")["value"] if category in set(
            cells.index.get_level_values("column")) else pd.Series(dtype=float)  # fmt: skip
        grid = category_rows(root, category, rows, scored)
        if grid is not None:
            out[category] = grid
    return out
