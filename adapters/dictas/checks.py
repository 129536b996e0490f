"""DictAS's plan-time parameter checks (``DictAS.validate_params``): the backbone and its weights
known to open_clip or timm (offline), layers that are blocks of it, heads dividing its width,
and the test-network options only where they apply."""

from __future__ import annotations

from typing import Any

import timm

from bench.backbones import did_you_mean, skeleton, timm_problem, weights_problem
from bench.params import ParamError

from ..dinomaly.encoder import SUBSTITUTE, EfficientNetEncoder
from .backbone import PAPER_BACKBONE, PAPER_WEIGHTS, default_layers, is_open_clip


def _open_clip_names() -> list[str]:
    try:
        import open_clip
    except ImportError:
        return []
    return open_clip.list_models()


def check_backbone(backbone: str, weights: str, clip: bool) -> None:
    """The backbone is an open_clip or timm model (or the substitute), ``weights`` one of its
    pretrained tags, "pretrained", "random" or a checkpoint file."""
    if clip:
        import open_clip

        words = (*open_clip.list_pretrained_tags_by_model(backbone), "random")
    elif backbone == SUBSTITUTE or timm.is_model(backbone.partition(".")[0]):
        words = ("pretrained", "random")
        problem = None if backbone == SUBSTITUTE else timm_problem(backbone, weights)
        if problem:
            raise ParamError.bad("backbone", backbone, problem)
    else:
        names = [*_open_clip_names(), *timm.list_models(), SUBSTITUTE]
        note = "" if _open_clip_names() else " (open_clip is not installed)"
        hint = did_you_mean(backbone, names, PAPER_BACKBONE)
        raise ParamError.bad("backbone", backbone, f"is not an open_clip or timm model{note}{hint}")
    problem = weights_problem(weights, words)
    if problem:
        raise ParamError.bad("weights", weights, problem)


def check_test_network(params: dict[str, Any], weights: str, clip: bool) -> None:
    """``backbone_depth``/``backbone_width`` shrink a randomly initialised network only."""
    depth, width, backbone = params["backbone_depth"], params["backbone_width"], params["backbone"]
    if depth is not None and backbone == SUBSTITUTE:
        raise ParamError.bad("backbone_depth", depth, f"does not apply to {SUBSTITUTE}")
    if depth is not None and (weights != "random" if clip else weights == "pretrained"):
        allowed = "weights='random'" + ("" if clip else " or a checkpoint file")
        raise ParamError.bad("backbone_depth", depth, f"applies only to {allowed}")
    if width is not None and not (clip and weights == "random"):
        raise ParamError.bad(
            "backbone_width", width, "applies only to an open_clip backbone with weights='random'"
        )
    if width is not None and width > 64 and width % 64:
        raise ParamError.bad("backbone_width", width, "must be at most 64 or a multiple of 64")


def backbone_shape(params: dict[str, Any], weights: str, clip: bool) -> tuple[int, int] | None:
    """(blocks, token width) of the token source as it will be built; None: unknown."""
    backbone, depth, width = params["backbone"], params["backbone_depth"], params["backbone_width"]
    if backbone == SUBSTITUTE:
        return EfficientNetEncoder.depth, EfficientNetEncoder.width
    if clip:
        import open_clip

        vision = open_clip.get_model_config(backbone)["vision_cfg"]
        if weights != "random":
            return int(vision["layers"]), int(vision["width"])
        return depth or int(vision["layers"]), width or int(vision["width"])
    vit = skeleton(backbone, depth=depth)
    if vit is None or not hasattr(vit, "blocks"):
        raise ParamError.bad("backbone", backbone, "is not a ViT with blocks (DictAS reads them)")
    return len(vit.blocks), vit.embed_dim


def check_dictas(params: dict[str, Any]) -> None:
    """Raises ParamError for the first parameter of DictAS's that cannot work."""
    backbone = params["backbone"]
    clip = is_open_clip(backbone)
    weights = params["weights"] or (PAPER_WEIGHTS if clip else "pretrained")
    check_backbone(backbone, weights, clip)
    check_test_network(params, weights, clip)
    shape = backbone_shape(params, weights, clip)
    if shape is None:
        return
    blocks, width = shape
    depth = params["backbone_depth"] if weights == "random" else None
    layers = params["layers"] or default_layers(backbone, depth)
    test_layers = params["test_layers"] or layers[: max(1, len(layers) // 2)]
    for name, value in (("layers", layers), ("test_layers", test_layers)):
        if value and max(value) > blocks:
            raise ParamError.bad(name, value, f"are not blocks of {backbone} (1..{blocks})")
    if width % params["heads"]:
        raise ParamError.bad(
            "heads", params["heads"], f"does not divide {backbone}'s width {width}"
        )
