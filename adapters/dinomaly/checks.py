"""Dinomaly's plan-time parameter checks (``Dinomaly.validate_params``): what the constructor's
type hints cannot express, checked offline against timm's registry and a weightless encoder."""

from __future__ import annotations

from typing import Any

from bench.backbones import skeleton, timm_problem, weights_problem
from bench.params import ParamError

from .encoder import SUBSTITUTE, EfficientNetEncoder

#: the block counts with official default layers (``encoder.default_layers``)
DEFAULT_DEPTHS = (12, 24)


def encoder_shape(encoder: str, depth: int | None) -> tuple[int, int] | None:
    """(blocks, width) of the encoder, or None when timm cannot build it without weights."""
    if encoder == SUBSTITUTE:
        return EfficientNetEncoder.depth, EfficientNetEncoder.width
    vit = skeleton(encoder, depth=depth)
    if vit is None:
        return None
    if not hasattr(vit, "blocks") or not hasattr(vit, "pos_embed"):
        raise ParamError.bad(
            "encoder", encoder, "is not a timm VisionTransformer (Dinomaly reads its blocks)"
        )
    return len(vit.blocks), vit.embed_dim


def check_encoder(params: dict[str, Any], paper: str) -> tuple[int, int] | None:
    """The encoder name, its weights and ``encoder_depth``; returns its (blocks, width)."""
    encoder, weights, depth = params["encoder"] or paper, params["weights"], params["encoder_depth"]
    if encoder != SUBSTITUTE:
        problem = timm_problem(encoder, weights, paper)
        if problem:
            raise ParamError.bad("encoder", encoder, problem)
    problem = weights_problem(weights)
    if problem:
        raise ParamError.bad("weights", weights, problem)
    if depth is not None and weights == "pretrained" and encoder != SUBSTITUTE:
        raise ParamError.bad(
            "encoder_depth",
            depth,
            "applies only to weights='random' or a checkpoint file (pretrained weights fix it)",
        )
    return encoder_shape(encoder, None if encoder == SUBSTITUTE else depth)


def check_layers(params: dict[str, Any], encoder: str, blocks: int | None) -> None:
    layers = params["layers"]
    if layers is not None and len(layers) % 2:
        raise ParamError.bad("layers", layers, "must be an even number of blocks (two groups)")
    if blocks is None:
        return
    if layers is not None and max(layers) >= blocks:
        raise ParamError.bad("layers", layers, f"are not blocks of {encoder} (0..{blocks - 1})")
    if layers is None and encoder != SUBSTITUTE and blocks not in DEFAULT_DEPTHS:
        raise ParamError.bad(
            "layers",
            layers,
            f"has no default for a {blocks}-block encoder: pass an even number of its blocks",
        )


def check_dinomaly(params: dict[str, Any], paper: str) -> None:
    """Raises ParamError for the first parameter of Dinomaly's that cannot work."""
    shape = check_encoder(params, paper)
    encoder = params["encoder"] or paper
    check_layers(params, encoder, None if shape is None else shape[0])
    if params["decoder_depth"] % 2:
        raise ParamError.bad("decoder_depth", params["decoder_depth"], "must be even (two groups)")
    heads = params["decoder_heads"]
    if heads is not None and shape is not None and shape[1] % heads:
        raise ParamError.bad(
            "decoder_heads", heads, f"does not divide {encoder}'s width {shape[1]}"
        )
    v2 = params["variant"] == "dinomaly2"
    iterations = params["iterations"] or (40000 if v2 else 10000)
    if params["warmup"] > iterations:
        raise ParamError.bad("warmup", params["warmup"], f"is more than iterations = {iterations}")
    if params["smoothing_kernel"] % 2 == 0:
        kernel = params["smoothing_kernel"]
        raise ParamError.bad("smoothing_kernel", kernel, "must be odd (a centred Gaussian)")
    narrow = params["narrow"] or (256 if v2 else None)
    if params["narrow_lr"] is not None and narrow is None:
        raise ParamError.bad(
            "narrow_lr",
            params["narrow_lr"],
            "applies only to a narrow bottleneck: set narrow, or variant='dinomaly2'",
        )
