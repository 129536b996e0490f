"""Which mask belongs to which anomalous image of a folder dataset: by stem, as anomalib's
Folder pairs them (its only check: the mask's name contains the image's stem)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .common import DatasetLayoutError

SHOWN = 8  # names listed in an error


def shown_names(paths: list[Path] | list[str]) -> str:
    shown = ", ".join(str(p) for p in paths[:SHOWN])
    return shown + (f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else "")


def _shared_folders(a: Path, b: Path) -> int:
    """How many parent-folder names two files share, counted from their own folders up."""
    n = 0
    for x, y in zip(reversed(a.parent.parts), reversed(b.parent.parts)):
        if x != y:
            break
        n += 1
    return n


#: what may follow an image's stem in its mask's name (``000_gt.png``, ``000-label.png``)
MASK_SEPARATORS = "_-. "


def _closest(image: Path, found: list[Path], where: str) -> Path:
    """Of the masks ``found`` for ``image``, the one whose folder names match best."""
    best = max(_shared_folders(image, m) for m in found)
    closest = [m for m in found if _shared_folders(image, m) == best]
    if len(closest) > 1:
        raise DatasetLayoutError(
            f"abnormal image {image} matches several masks by stem: {shown_names(closest)}; {where}"
        )
    return closest[0]


def match_masks(images: list[Path], masks: list[Path], where: str) -> dict[Path, Path]:
    """Each anomalous image's mask: the mask named ``<stem>`` or ``<stem>_mask`` (any
    extension), else the one mask left whose name is ``<stem>`` followed by a separator and
    anything (``<stem>_gt``, ``<stem>-label``: anomalib's Folder only asks that the mask's name
    contain the image's stem); where several images share a stem, the one whose folder names
    match. An image without a mask, a mask without an image, or an ambiguous pair is an error
    (``where`` names the folders)."""
    by_stem: dict[str, list[Path]] = {}
    for mask in masks:
        by_stem.setdefault(mask.stem, []).append(mask)
    pairs, rest = {}, []
    for image in images:
        found = by_stem.get(image.stem, []) + by_stem.get(image.stem + "_mask", [])
        if found:
            pairs[image] = _closest(image, found, where)
        else:
            rest.append(image)
    used = set(pairs.values())
    by_prefix: dict[str, list[Path]] = {}
    for mask in (m for m in masks if m not in used):
        for i, char in enumerate(mask.stem):
            if i and char in MASK_SEPARATORS:
                by_prefix.setdefault(mask.stem[:i], []).append(mask)
    missing = []
    for image in rest:
        found = by_prefix.get(image.stem, [])
        if found:
            pairs[image] = _closest(image, found, where)
        else:
            missing.append(image.stem)
    if missing:
        raise DatasetLayoutError(
            f"{len(missing)} abnormal image(s) have no mask of the same stem (<stem>, "
            f"<stem>_mask or <stem>_<anything>): {shown_names(missing)}; {where}"
        )
    twice = [m for m, n in Counter(pairs.values()).items() if n > 1]
    if twice:
        raise DatasetLayoutError(f"mask(s) {shown_names(twice)} match several images; {where}")
    used = set(pairs.values())
    orphans = [m.stem for m in masks if m not in used]
    if orphans:
        raise DatasetLayoutError(
            f"{len(orphans)} mask(s) have no abnormal image of the same stem: {shown_names(orphans)}; "
            f"{where}"
        )
    return pairs
