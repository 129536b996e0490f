"""Deterministic generator of a user's folders of images, as the ``folder`` dataset reads them.

``normal/``, ``abnormal/`` and ``masks/`` below the root, with no normal test folder (so the
seeded split of ``normal/`` makes the test normals). The images are green boards with copper
traces and a chip (:mod:`.synthetic_visa`'s ``pcb``); the anomalies carry one of the defects of
:mod:`.synthetic_ad`. File types differ as they do in users' folders: normal images png, jpg
and bmp; abnormal images jpg and png; masks png or bmp, named ``<stem>`` or ``<stem>_mask``,
storing 255. The same seed writes the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .synthetic_ad import DEFECTS, _defect
from .synthetic_visa import _pcb

NORMAL_SUFFIXES = (".png", ".jpg", ".bmp")
ABNORMAL_SUFFIXES = (".jpg", ".png")
#: (mask suffix, name suffix) by anomaly index
MASK_NAMES = ((".png", ""), (".bmp", "_mask"), (".png", "_mask"), (".bmp", ""))


def save_image(path: Path, image: np.ndarray, rng: np.random.Generator) -> None:
    """float [H,W,3] in [0,1] with a little sensor noise, in the format ``path`` names."""
    pixels = np.clip(image * 255 + rng.normal(0, 1.0, image.shape), 0, 255).round()
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"quality": 95, "subsampling": 0} if path.suffix == ".jpg" else {}
    Image.fromarray(pixels.astype(np.uint8)).save(path, **options)


def save_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def generate(
    root: str | Path,
    size: tuple[int, int] = (96, 128),
    n_normal: int = 40,
    n_abnormal: int = 16,
    seed: int = 0,
) -> Path:
    """Writes ``<root>/{normal,abnormal,masks}``; ``size`` is (height, width)."""
    root = Path(root)
    shape = (int(size[0]), int(size[1]))
    rng = np.random.default_rng([seed, 7])
    for i in range(n_normal):
        image, _, _ = _pcb(rng, shape)
        save_image(root / "normal" / f"good_{i:03d}{NORMAL_SUFFIXES[i % 3]}", image, rng)
    for i in range(n_abnormal):
        image, support, _ = _pcb(rng, shape)
        mask = _defect(rng, image, support, DEFECTS[i % len(DEFECTS)], 1.4 * min(shape), None)
        if not mask.any():
            raise RuntimeError(f"no room for a defect in anomaly {i}")
        stem = f"defect_{i:03d}"
        save_image(root / "abnormal" / f"{stem}{ABNORMAL_SUFFIXES[i % 2]}", image, rng)
        suffix, tail = MASK_NAMES[i % len(MASK_NAMES)]
        save_mask(root / "masks" / f"{stem}{tail}{suffix}", mask)
    return root
