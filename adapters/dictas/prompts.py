"""The text side of DictAS: CLIP prompt ensembles of a normal and an anomalous state (the
WinCLIP / AnomalyCLIP lists, as the official DictAS code uses them)."""

from __future__ import annotations

NORMAL_STATES = (
    "{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
    "{} without damage",
)  # fmt: skip
ANOMALOUS_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a bright photo of a {}.", "a dark photo of the {}.",
    "a photo of my {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a photo of one {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "a low resolution photo of a {}.", "a photo of a large {}.",
    "a blurry photo of a {}.",
    "a jpeg \\ photo of the {}.",  # sic: the official list has this one, backslash included
    "a good photo of a {}.", "a photo of the small {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "a dark photo of a {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "there is a {} in the scene.", "there is the {} in the scene.",
    "this is a {} in the scene.", "this is the {} in the scene.", "this is one {} in the scene.",
)  # fmt: skip


def prompt_sentences(category: str) -> tuple[list[str], list[str]]:
    """Every template x state sentence for the normal and for the anomalous state of
    ``category`` (its folder name, as the official code uses it)."""
    return tuple(
        [t.format(s.format(category)) for s in states for t in TEMPLATES]
        for states in (NORMAL_STATES, ANOMALOUS_STATES)
    )
