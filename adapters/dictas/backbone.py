"""DictAS's frozen token sources: an open_clip CLIP (the paper's ViT-L/14 at 336 px, with its
text encoder), a timm ViT, or the offline substitute (packaged ImageNet EfficientNet-Lite0).

Each returns, for images [B, 3, H, W] in [0, 1], the patch tokens of the requested layers
(1-indexed blocks, residual stream, no class token) [B, h*w, C], the token grid, and the
global image embedding (CLIP only, else None).
"""

from __future__ import annotations

import copy
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from bench.backbones import WeightsNotFoundError, normalize, skeleton
from bench.params import ParamError

from ..dinomaly.encoder import SUBSTITUTE, create_encoder
from .prompts import prompt_sentences

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: the paper's backbone (open_clip name and pretrained tag)
PAPER_BACKBONE, PAPER_WEIGHTS = "ViT-L-14-336", "openai"


def is_open_clip(name: str) -> bool:
    try:
        import open_clip
    except ImportError:
        return False
    return name in open_clip.list_models()


def default_layers(backbone: str, depth: int | None = None) -> tuple[int, ...]:
    """The official 6, 12, 18, 24 of a 24-block ViT: four evenly spaced blocks (1-indexed; 3,
    6, 9, 12 of a 12-block one); for the substitute, blocks 2, 4, 6, 8 of its 8."""
    if backbone == SUBSTITUTE:
        return (2, 4, 6, 8)
    if depth is None:
        depth = _depth(backbone)
    if depth < 4:  # a tiny test network: every block
        return tuple(range(1, depth + 1))
    step = depth // 4
    return tuple(range(step, 4 * step + 1, step))


def _depth(backbone: str) -> int:
    if is_open_clip(backbone):
        import open_clip

        return int(open_clip.get_model_config(backbone)["vision_cfg"]["layers"])
    vit = skeleton(backbone)  # its structure on the meta device: no weights built
    if vit is None:  # a model timm cannot build there: the real one, without weights
        vit = timm.create_model(backbone, pretrained=False, pretrained_cfg_overlay={})
    if not hasattr(vit, "blocks"):
        raise ParamError.bad("backbone", backbone, "is not a ViT with blocks (timm or open_clip)")
    return len(vit.blocks)


def create_token_source(
    backbone: str,
    weights: str,
    layers: tuple[int, ...],
    input_size: int,
    depth: int | None = None,
    width: int | None = None,
) -> TokenSource:
    """The frozen token source; ``depth``/``width`` shrink a CLIP or ViT for random-weight tests."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random weights are the same on every call
        if is_open_clip(backbone):
            source: TokenSource = ClipTokens(backbone, weights, layers, input_size, depth, width)
        else:
            if width is not None:
                raise ValueError("backbone_width applies to open_clip backbones only")
            source = EncoderTokens(backbone, weights, layers, input_size, depth)
    source.eval()
    for p in source.parameters():
        p.requires_grad_(False)
    return source


class TokenSource(nn.Module):
    width: int
    embed_dim: int | None = None  # the CLIP joint embedding, None without a text encoder
    input_size: int

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != (self.input_size, self.input_size):
            images = F.interpolate(
                images, size=(self.input_size,) * 2, mode="bicubic", antialias=True
            ).clamp(0, 1)
        return images

    @torch.no_grad()
    def text_features(self, category: str) -> torch.Tensor | None:
        """[E, 2] normal and anomalous prompt-ensemble embeddings (None: no text encoder)."""
        return None


class ClipTokens(TokenSource):
    """An open_clip CLIP: ``weights`` a pretrained tag (hub, or its local cache), a local
    checkpoint file, or "random"."""

    def __init__(self, name, weights, layers, input_size, depth=None, width=None) -> None:
        super().__init__()
        import open_clip

        if weights == "random":
            cfg = copy.deepcopy(open_clip.get_model_config(name))
            cfg["vision_cfg"]["image_size"] = input_size
            if depth is not None:
                cfg["vision_cfg"]["layers"] = depth
                cfg["text_cfg"]["layers"] = min(depth, cfg["text_cfg"]["layers"])
            if width is not None:
                cfg["vision_cfg"]["width"] = width
                cfg["vision_cfg"]["head_width"] = min(64, width)
                cfg["text_cfg"]["width"], cfg["text_cfg"]["heads"] = width, max(1, width // 64)
                cfg["embed_dim"] = width
            cfg["quick_gelu"] = False  # exact GELU, as the official (exact_gelu below too)
            model = open_clip.CLIP(**cfg)
        else:
            if depth is not None or width is not None:
                raise ValueError("backbone_depth/backbone_width only apply to weights='random'")
            pretrained = weights
            if weights not in open_clip.list_pretrained_tags_by_model(name):
                if not Path(weights).is_file():
                    raise WeightsNotFoundError(
                        f"weights {weights!r} are neither a pretrained tag of {name} "
                        f"({open_clip.list_pretrained_tags_by_model(name)}) nor a file"
                    )
            try:
                model = open_clip.create_model(
                    name, pretrained=pretrained, force_image_size=input_size
                )
            except Exception as err:  # hub unreachable and nothing in the local cache
                raise WeightsNotFoundError(
                    f"no {weights!r} weights for {name}: {type(err).__name__}: {err}. Pass "
                    "weights=<path to the checkpoint file> (e.g. OpenAI's ViT-L-14-336px.pt), "
                    f"or backbone='{SUBSTITUTE}' for the offline substitute."
                ) from err
        exact_gelu(model)
        self.model, self.name = model, name
        self.tokenizer = open_clip.get_tokenizer(name)
        blocks = model.visual.transformer.layers
        if not layers or max(layers) > blocks or min(layers) < 1:
            raise ValueError(f"layers {layers} are not blocks of {name} (1..{blocks})")
        self.layers, self.input_size = tuple(layers), input_size
        self.width = model.visual.transformer.width
        self.embed_dim = model.visual.output_dim

    def forward(self, images: torch.Tensor):
        x = normalize(self.prepare(images), CLIP_MEAN, CLIP_STD)
        out = self.model.visual.forward_intermediates(
            x, indices=[i - 1 for i in self.layers], output_fmt="NLC"
        )
        patch = self.model.visual.patch_size
        grid = (x.shape[-2] // patch[0], x.shape[-1] // patch[1])
        return out["image_intermediates"], grid, out["image_features"]

    @torch.no_grad()
    def text_features(self, category: str) -> torch.Tensor:
        device = next(self.model.parameters()).device
        states = []
        for sentences in prompt_sentences(category):
            emb = self.model.encode_text(self.tokenizer(sentences).to(device)).float()
            emb = F.normalize(emb, dim=-1).mean(0)
            states.append(F.normalize(emb, dim=0))
        return torch.stack(states, 1)


def exact_gelu(model: nn.Module) -> int:
    """Replaces every QuickGELU of an open_clip model by exact GELU, in place, and returns how
    many: the official DictAS CLIP uses ``nn.GELU()`` in every block, while open_clip builds
    QuickGELU for the ``openai`` tag in some versions (2.24), which moves the tokens by ~0.5%."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child).__name__ == "QuickGELU":
                setattr(module, name, nn.GELU())
                swapped += 1
    return swapped


class EncoderTokens(TokenSource):
    """A timm ViT (prefix tokens dropped) or the offline substitute, ImageNet statistics."""

    def __init__(self, name, weights, layers, input_size, depth=None) -> None:
        super().__init__()
        zero_based = tuple(i - 1 for i in layers)
        self.encoder = create_encoder(name, weights, zero_based, depth)
        self.layers, self.input_size = tuple(layers), input_size
        self.width = self.encoder.embed_dim

    def forward(self, images: torch.Tensor):
        tokens, grid = self.encoder(normalize(self.prepare(images)))
        prefix = self.encoder.prefix
        return [t[:, prefix:] for t in tokens], tuple(grid), None
