"""``dictas``: class-generalisable few-shot anomaly segmentation by dictionary lookup (Qu et al.,
ICCV 2025). Two stages: generators trained on another dataset's normal images, then each
category's k normal references as the dictionary."""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F

from bench.capabilities import ReferenceStage, TransductiveScores
from bench.params import Length, NonEmpty, Range
from bench.registry import register_detector
from bench.training import TrainableDetector, amp_dtype
from bench.types import Batch, Prediction

from ..common import gaussian_blur
from .backbone import (
    PAPER_BACKBONE,
    PAPER_WEIGHTS,
    create_token_source,
    default_layers,
    is_open_clip,
)
from .checks import check_dictas
from .lookup import Dictionary, map_tokens, pool, token_map
from .synthesis import TextureFolder, augment_references, rotate, synthesize_anomalies
from .validation import Validation

SUBSTITUTE = "efficientnet_lite0"
#: Adam's (beta1, beta2)
_Betas = Annotated[tuple[Annotated[float, Range(ge=0, lt=1)], ...], Length(2, 2)]
#: the official extra references of "screw" (k <= 4): copies rotated by these angles
REFERENCE_ANGLES = tuple(range(-180, 181, 45))


@register_detector("dictas")
class DictAS(TrainableDetector, ReferenceStage, TransductiveScores):
    """DictAS: a frozen CLIP ViT-L/14 at 336 px (patch tokens of blocks 6, 12, 18, 24), three
    generators (query, key, value: LayerNorm, 4-head self-attention, MLP) shared by all layers
    and scales, and a sparse lookup: each test token's query is matched against the keys of
    every reference token of the category, sparsemax(q . k / sqrt(C)) weights the values, and
    what cannot be looked up is anomalous: map (1 - cos(query feature, retrieved)) / 2 per
    layer and scale (1 and 3: 3x3 mean pooling), averaged at 336 px, Gaussian blur (scipy's).
    The official test's two modes (``test_mode``): best segmentation (sigma 6; screw with more
    than 4 references scores every training layer) and best classification (sigma 2; set
    ``sigma=0`` on VisA, which the official code leaves unblurred in that mode).

    Stage 1 (``fit``, the ``train_on`` dataset's normal images): queries get a synthetic
    anomaly with probability 0.3, the reference is an augmented copy of the clean image; loss =
    query loss (mean 1 - cos over normal tokens) + 0.1 x hinge (normal vs anomalous distance)
    + 0.1 x text alignment (CLIP backbones). Model selection on a held-out part of the training
    images (``val_fraction``); the value generator is frozen after the first epoch without
    improvement, then queries pass it (as the official code). Stage 2 (``fit_references``):
    the k references of the evaluated category.

    Image score: (1 - ``text_score_weight``) x map maximum + ``text_score_weight`` x the CLIP
    zero-shot anomaly probability, both min-max normalised over the category's test set first
    (``score_normalisation="per_category"``, the official score: transductive, recorded as
    such); ``"none"`` mixes each image's raw values (inductive).
    ``backbone="efficientnet_lite0"`` is the offline substitute (no text branch);
    ``training_free=True`` the ablation without generators (raw features looked up).
    """

    modality = "image"
    resampling = "pil-bicubic"  # the official loader: PIL bicubic Resize to the input size
    fit_scopes = ("train_on", "shots")
    #: the pretrained token source, built from the parameters on first use, never saved
    frozen = ("_source",)
    #: the official code runs in float32; ``amp="bf16"`` puts only the frozen backbone in bf16
    inference_amp = False
    #: a references stage saves its references only, not the generators again (for CLIP-L
    #: about 85 MB per category and draw); the harness loads it on top of the first stage
    incremental = True
    REFERENCE_STATE = ("reference_images_", "category_")
    #: arguments that only change scoring: entries differing in them share their fits
    test_params = (
        "test_mode", "sigma", "test_layers", "text_score_weight", "score_normalisation",
        "rotated_references", "all_layers_categories",
    )  # fmt: skip

    def __init__(
        self,
        backbone: str = PAPER_BACKBONE,
        weights: str | None = None,
        input_size: Annotated[int, Range(ge=14)] = 336,
        layers: Annotated[tuple[Annotated[int, Range(ge=1)], ...], NonEmpty] | None = None,
        test_layers: Annotated[tuple[Annotated[int, Range(ge=1)], ...], NonEmpty] | None = None,
        scales: Annotated[tuple[Annotated[int, Range(ge=1)], ...], NonEmpty] = (1, 3),
        backbone_depth: Annotated[int, Range(ge=1)] | None = None,
        backbone_width: Annotated[int, Range(ge=8)] | None = None,
        heads: Annotated[int, Range(ge=1)] = 4,
        dropout: Annotated[float, Range(ge=0, lt=1)] = 0.1,
        epochs: Annotated[int, Range(ge=1)] = 30,
        lr: Annotated[float, Range(gt=0)] = 1e-4,
        betas: _Betas = (0.5, 0.999),
        plateau_factor: Annotated[float, Range(gt=0, lt=1)] = 0.8,
        plateau_patience: Annotated[int, Range(ge=0)] = 2,
        anomaly_probability: Annotated[float, Range(ge=0, le=1)] = 0.3,
        reference_augmentation: Annotated[float, Range(ge=0, le=1)] = 0.9,
        textures: str | None = None,
        contrastive_weight: Annotated[float, Range(ge=0)] = 0.1,
        text_weight: Annotated[float, Range(ge=0)] = 0.1,
        val_fraction: Annotated[float, Range(ge=0, lt=1)] = 0.1,
        val_images: Annotated[int, Range(ge=1)] = 64,
        test_mode: Literal["segmentation", "classification"] = "segmentation",
        sigma: Annotated[float, Range(ge=0)] | None = None,
        text_score_weight: Annotated[float, Range(ge=0, le=1)] = 0.2,
        score_normalisation: Literal["none", "per_category"] = "per_category",
        rotated_references: tuple[str, ...] = ("screw",),
        all_layers_categories: tuple[str, ...] = ("screw",),
        training_free: bool = False,
        seed: int = 0,
        amp: Literal["auto", "bf16", "fp16", "off"] = "off",
        checkpoint_every: Annotated[int, Range(ge=1)] = 500,
    ) -> None:
        self.backbone, self.input_size = backbone, input_size
        clip = is_open_clip(backbone)
        self.weights = (PAPER_WEIGHTS if clip else "pretrained") if weights is None else weights
        self.backbone_depth, self.backbone_width = backbone_depth, backbone_width
        self.layers = tuple(layers) if layers is not None else None
        if self.layers is None:
            depth = backbone_depth if self.weights == "random" else None
            self.layers = default_layers(backbone, depth)
        # the official MVTec AD test uses the first two of the four training layers
        half = self.layers[: max(1, len(self.layers) // 2)]
        self.test_layers = tuple(test_layers) if test_layers is not None else half
        self.scales = tuple(scales)
        if any(s < 1 for s in self.scales) or not self.scales:
            raise ValueError(f"scales must be pooling sizes >= 1, got {scales}")
        self.heads, self.dropout, self.epochs, self.lr = heads, dropout, epochs, lr
        if len(betas) != 2:
            raise ValueError(f"betas must be two numbers (Adam's beta1, beta2), got {betas}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.plateau_factor, self.plateau_patience = plateau_factor, plateau_patience
        self.anomaly_probability = anomaly_probability
        self.reference_augmentation = reference_augmentation
        self.textures = textures
        self.contrastive_weight, self.text_weight = contrastive_weight, text_weight
        self.val_fraction, self.val_images = val_fraction, val_images
        self.test_mode = test_mode
        if sigma is None:  # the official modes: best segmentation 6, best classification 2
            sigma = 6.0 if test_mode == "segmentation" else 2.0
        self.sigma, self.text_score_weight = sigma, text_score_weight
        self.score_normalisation = score_normalisation
        self.rotated_references = tuple(rotated_references)
        self.all_layers_categories = tuple(all_layers_categories)
        self.training_free = training_free
        self.seed, self.amp, self.checkpoint_every = seed, amp, checkpoint_every
        self.grad_clip = None
        self._source: torch.nn.Module | None = None
        self._text: dict[str, torch.Tensor | None] = {}
        self._entries: list | None = None
        self._test_parts: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    @classmethod
    def validate_params(cls, params: dict[str, Any]) -> None:
        """The backbone and its weights known to open_clip or timm (offline), layers and test
        layers that are blocks of it, heads dividing its width, backbone_depth/backbone_width
        only for a randomly initialised test network (``checks.py``)."""
        check_dictas(params)

    @classmethod
    def resolve_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Weights, layers and test layers as used (they depend on the backbone)."""
        return cls(**params).get_params()

    @classmethod
    def transductive(cls, params: dict[str, Any]) -> str | None:
        if params.get("score_normalisation", "per_category") != "per_category":
            return None
        return (
            "image scores min-max normalised over the category's whole test set before the "
            "map and text terms are mixed (the official DictAS score; score_normalisation="
            "'none' is the inductive option)"
        )

    @classmethod
    def substitutes(cls, params: dict[str, Any]) -> list[str]:
        backbone = params.get("backbone") or PAPER_BACKBONE
        paper = f"{PAPER_BACKBONE} ({PAPER_WEIGHTS})"
        notes = []
        if params.get("training_free"):
            notes.append("training-free ablation: identity generators, not DictAS's learned ones")
        if backbone == SUBSTITUTE:
            notes.append(
                f"token source substitute {SUBSTITUTE} (ImageNet, no text branch), not the "
                f"paper's CLIP {paper}"
            )
        elif params.get("weights") == "random":
            notes.append(f"backbone {backbone} with random weights, not the paper's {paper}")
        elif backbone != PAPER_BACKBONE:
            notes.append(f"backbone {backbone}, not the paper's {paper}")
        if not params.get("textures") and not params.get("training_free"):
            notes.append(
                "synthetic-anomaly textures cut from other training images, not DTD textures"
            )
        return notes

    # -- modules -----------------------------------------------------------------------------
    @property
    def all_layers(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.layers) | set(self.test_layers)))

    @property
    def source(self) -> torch.nn.Module:
        """The frozen token source (built on first use; never part of the fitted state)."""
        if self._source is None:
            self._source = create_token_source(
                self.backbone, self.weights, self.all_layers, self.input_size,
                self.backbone_depth, self.backbone_width,
            ).to(self.device)  # fmt: skip
        return self._source

    @property
    def has_text(self) -> bool:
        return self.source.embed_dim is not None

    def to(self, device):
        super().to(device)  # moves the frozen token source too (``frozen``)
        self._entries = None
        return self

    def _tokens(self, images: torch.Tensor, layers: tuple[int, ...]):
        """Patch tokens of ``layers`` (float32), the grid and the global embedding; the frozen
        backbone alone runs under ``amp`` (everything after it in float32, as the official)."""
        dtype = amp_dtype(self.device, self.amp)
        with torch.no_grad(), torch.autocast(self.device.type, dtype, enabled=dtype is not None):
            tokens, grid, glob = self.source(images)
        chosen = [tokens[self.all_layers.index(i)].float() for i in layers]
        return chosen, grid, None if glob is None else glob.float()

    def _text_features(self, category: str) -> torch.Tensor | None:
        if category not in self._text:
            with _float32(self.device):
                self._text[category] = self.source.text_features(category)
        return self._text[category]

    # -- stage 1: the generators ---------------------------------------------------------------
    def fit(self, train) -> None:
        if self.training_free:  # identity generators: nothing to learn
            self.dictionary_ = Dictionary(self.source.width, identity=True).to(self.device)
            return
        self._steps_per_epoch = len(train)
        self.iterations = self.epochs * self._steps_per_epoch
        self._textures = TextureFolder(self.textures) if self.textures else None
        self._validation = Validation(self.val_fraction, self.val_images, self._textures)
        self._frozen_value, self._best, self._epoch_losses = False, None, []
        super().fit(train)

    def build(self, example: Batch) -> None:
        fuse = (len(self.layers), self.source.embed_dim) if self.has_text else None
        self.dictionary_ = Dictionary(self.source.width, self.heads, self.dropout, fuse)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.dictionary_.parameters(), lr=self.lr, betas=self.betas)
        self._plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=self.plateau_factor, patience=self.plateau_patience
        )
        return opt, None

    def _generator(self, step: int, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step * 7 + salt)

    def training_step(self, batch: Batch, step: int) -> torch.Tensor:
        keys = [_holdout_key(m) for m in batch.meta]
        keep = self._validation.split(batch.image, keys, [m["category"] for m in batch.meta])
        if not keep:  # every image of the batch is held out: a step without gradient
            return sum(p.sum() * 0 for p in self.dictionary_.parameters())
        clean = batch.image[keep]
        categories = [batch.meta[i]["category"] for i in keep]
        gen = self._generator(step)
        query, mask, label = synthesize_anomalies(
            clean, gen, self.anomaly_probability, self._textures
        )
        reference = augment_references(clean, gen, self.reference_augmentation)
        q_tokens, grid, _ = self._tokens(query, self.layers)
        r_tokens, _, _ = self._tokens(reference, self.layers)
        if self._frozen_value:  # phase 2: queries pass the (frozen) value generator
            with _float32(self.device):
                q_tokens = [self.dictionary_.value(t) for t in q_tokens]
        anomalous = F.interpolate(mask.to(q_tokens[0]), size=grid, mode="bilinear",
                                  align_corners=True) > 0.5  # fmt: skip
        anomalous = anomalous.flatten(1).float()
        with _float32(self.device):
            query_loss, hinge, retrieved_s1 = self._lookup_losses(
                q_tokens, r_tokens, grid, anomalous
            )
            loss = query_loss + self.contrastive_weight * hinge
            if self.has_text and self.text_weight:
                text = torch.stack([self._text_features(c) for c in categories]).to(query_loss)
                loss = loss + self.text_weight * self._text_loss(
                    q_tokens, retrieved_s1, text, label.to(self.device)
                )
        self._epoch_losses.append(float(query_loss.detach()))
        return loss

    def _lookup_losses(self, q_tokens, r_tokens, grid, anomalous):
        """Query loss and hinge summed over layers x scales, and the scale-1 retrievals."""
        normal = 1 - anomalous
        query_loss = hinge = 0.0
        retrieved_s1 = []
        for q, r in zip(q_tokens, r_tokens):
            for size in self.scales:
                qs = map_tokens(pool(token_map(q, grid), size))
                rs = map_tokens(pool(token_map(r, grid), size))
                got = self.dictionary_.lookup(qs, *self.dictionary_.entries(rs))
                if size == 1:
                    retrieved_s1.append(got)
                distance = 1 - F.cosine_similarity(qs, got, dim=-1)  # [B, N]
                loss_n = (distance * normal).sum(1) / (normal.sum(1) + 1e-6)
                loss_a = (distance * anomalous).sum(1) / (anomalous.sum(1) + 1e-6)
                gap = torch.where(loss_a == 0, torch.zeros_like(loss_n), loss_n - loss_a)
                gap = gap.clamp(min=0)
                hinge = hinge + gap.sum() / ((gap != 0).sum() + 1e-6)
                query_loss = query_loss + loss_n.mean()
        return query_loss, hinge, retrieved_s1

    def _text_loss(self, q_tokens, retrieved, text, label) -> torch.Tensor:
        """Cross-entropy of the fused query vs its label and of the fused retrieval vs
        normal, against the prompt ensembles (100 x cosine)."""
        fuse = self.dictionary_.fuse
        x_q = F.normalize(fuse([F.normalize(t, dim=-1) for t in q_tokens]), dim=-1)
        x_r = F.normalize(fuse([F.normalize(t, dim=-1) for t in retrieved]), dim=-1)
        logits_q = 100 * torch.einsum("be,bes->bs", x_q, text)
        logits_r = 100 * torch.einsum("be,bes->bs", x_r, text)
        return F.cross_entropy(logits_q, label) + F.cross_entropy(logits_r, torch.zeros_like(label))

    def after_step(self, step: int, optimizer) -> None:
        if (step + 1) % self._steps_per_epoch:
            return
        self._plateau.step(sum(self._epoch_losses) / max(1, len(self._epoch_losses)))
        self._epoch_losses = []
        if not self._validation.ready():
            return
        ap = self._validation_ap()
        self.val_log_ = [*getattr(self, "val_log_", []), ((step + 1) // self._steps_per_epoch, ap)]
        if self._best is None or ap > self._best[0]:
            self._best = (ap, copy.deepcopy(self.dictionary_.state_dict()))
        elif not self._frozen_value:  # back to the best weights, then freeze the value generator
            self.dictionary_.load_state_dict(self._best[1])
            self._freeze_value(optimizer)

    def _validation_ap(self) -> float:
        """Pixel AP on the held-out images (dropout off)."""
        self.dictionary_.eval()
        try:
            return self._validation.score(self._val_maps)
        finally:
            self.dictionary_.train()

    def _freeze_value(self, optimizer) -> None:
        for p in self.dictionary_.value.parameters():
            p.requires_grad_(False)
        optimizer.state.clear()  # the official code restarts Adam's moments here
        self._frozen_value = True

    @torch.no_grad()
    def _val_maps(self, query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Unblurred maps of validation queries [B,3,H,W], each against its own reference, on
        every training layer (the official validation)."""
        r_tokens, grid, _ = self._tokens(reference.to(self.device), self.layers)
        maps = []
        for i in range(len(query)):
            entries = self._entries_for([t[i : i + 1] for t in r_tokens], grid)
            image = query[i : i + 1].to(self.device)
            maps.append(self._maps(image, entries, self.layers, sigma=0.0)[0])
        return torch.stack(maps)

    def training_state(self) -> dict[str, Any]:
        return {
            "frozen_value": self._frozen_value,
            "best": self._best,
            "epoch_losses": self._epoch_losses,
            "plateau": self._plateau.state_dict(),
            "validation": self._validation.state_dict(),
            "val_log": getattr(self, "val_log_", []),
        }

    def restore_training_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self._best, self._epoch_losses = state["best"], state["epoch_losses"]
        self._plateau.load_state_dict(state["plateau"])
        self._validation.load_state_dict(state["validation"])
        self.val_log_ = state["val_log"]
        if state["frozen_value"]:
            for p in self.dictionary_.value.parameters():
                p.requires_grad_(False)
            self._frozen_value = True

    def after_training(self, train) -> None:
        """Keeps the weights of the best validation epoch (the last ones without validation)."""
        if self._best is not None:
            self.dictionary_.load_state_dict(self._best[1])
            self.selected_epoch_ = max(self.val_log_, key=lambda r: r[1])[0]
        self.dictionary_.requires_grad_(False)
        self._epoch_losses = []

    # -- stage 2: the references ---------------------------------------------------------------
    def fit_references(self, references) -> None:
        images, categories = [], set()
        for batch in references:
            images.append(batch.image.float().cpu())
            categories |= {m["category"] for m in batch.meta}
        if len(categories) != 1:
            raise ValueError(f"dictas references must come from one category, got {categories}")
        self.reference_images_ = torch.cat(images)
        self.category_ = categories.pop()
        self._entries = None

    def stage_state(self, stage: str) -> dict[str, Any]:
        """Stage 1: everything it learned; a references stage: its references alone."""
        state = self.fitted_state()
        if stage == "references":
            return {k: v for k, v in state.items() if k in self.REFERENCE_STATE}
        return {k: v for k, v in state.items() if k not in self.REFERENCE_STATE}

    def _reference_images(self) -> torch.Tensor:
        refs = self.reference_images_.to(self.device)
        if self.category_ in self.rotated_references and len(refs) <= 4:
            angles = torch.tensor(REFERENCE_ANGLES, dtype=torch.float32)
            copies = [rotate(refs, float(a)) for a in angles]
            refs = torch.stack([refs, *copies], 1).flatten(0, 1)  # each reference, its copies
        return refs

    def _entries_for(self, r_tokens: list[torch.Tensor], grid) -> list[list[tuple]]:
        """Keys and values of every layer and scale: all reference tokens pooled on their own
        grid, then concatenated into one dictionary."""
        out = []
        for r in r_tokens:
            per_scale = []
            for size in self.scales:
                tokens = map_tokens(pool(token_map(r, grid), size)).reshape(1, -1, r.shape[-1])
                per_scale.append(self.dictionary_.entries(tokens))
            out.append(per_scale)
        return out

    @property
    def scored_layers(self) -> tuple[int, ...]:
        """The test layers; in the best-segmentation mode, every training layer for
        ``all_layers_categories`` with more than 4 references (the official screw setting)."""
        many = len(self.reference_images_) > 4
        screw = self.test_mode == "segmentation" and self.category_ in self.all_layers_categories
        return self.layers if many and screw else self.test_layers

    def _dictionary_entries(self) -> list[list[tuple]]:
        if self._entries is None:
            layers = self.scored_layers
            refs = self._reference_images()
            chunks = [self._tokens(c, layers) for c in refs.split(8)]
            grid = chunks[0][1]
            r_tokens = [torch.cat([c[0][i] for c in chunks]) for i in range(len(layers))]
            with _float32(self.device):
                self._entries = self._entries_for(r_tokens, grid)
        return self._entries

    # -- scoring -----------------------------------------------------------------------------
    def _maps(
        self,
        images: torch.Tensor,
        entries,
        layers: tuple[int, ...],
        sigma: float,
        glob_out: list | None = None,
    ) -> torch.Tensor:
        """Anomaly maps [B, S, S] at the input size, blurred with ``sigma`` (float32)."""
        q_tokens, grid, glob = self._tokens(images, layers)
        if glob_out is not None:
            glob_out.append(glob)
        size = (self.input_size, self.input_size)
        maps = []
        with _float32(self.device):
            for q, per_scale in zip(q_tokens, entries):
                q = self.dictionary_.value(q)
                for pooling, (keys, values) in zip(self.scales, per_scale):
                    qs = map_tokens(pool(token_map(q, grid), pooling))
                    got = self.dictionary_.lookup(qs, keys, values)
                    distance = (1 - F.cosine_similarity(qs, got, dim=-1)) / 2
                    distance = distance.reshape(len(images), 1, *grid)
                    upsampled = F.interpolate(distance, size, mode="bilinear", align_corners=True)
                    maps.append(upsampled[:, 0])
            return gaussian_blur(torch.stack(maps).mean(0), sigma)

    @torch.no_grad()
    def predict(self, batch: Batch) -> Prediction:
        self.dictionary_.eval()
        glob: list = []
        entries = self._dictionary_entries()
        image = batch.image.to(self.device)
        maps = self._maps(image, entries, self.scored_layers, self.sigma, glob)
        peak = maps.flatten(1).max(1).values
        text = self._text_scores(glob[0])
        if self.score_normalisation == "per_category":
            self._test_parts.append((peak.cpu(), None if text is None else text.cpu()))
        if text is None or not self.text_score_weight:
            return Prediction(score=peak, anomaly_map=maps)
        w = self.text_score_weight
        return Prediction(score=(1 - w) * peak + w * text, anomaly_map=maps)

    def _text_scores(self, glob: torch.Tensor | None) -> torch.Tensor | None:
        """CLIP zero-shot anomaly probability of each test image (None without text)."""
        if glob is None:
            return None
        text = self._text_features(self.category_).to(glob)
        with _float32(self.device):
            logits = 100 * F.normalize(glob.float(), dim=-1) @ text.float()
            return logits.softmax(-1)[:, 1]

    def start_test(self) -> None:
        self._test_parts = []

    def test_scores(self) -> torch.Tensor | None:
        """``score_normalisation="per_category"``: map maxima and text scores min-max
        normalised over the category's test images, then weighted (the official scores)."""
        if self.score_normalisation != "per_category" or not self._test_parts:
            return None
        peak = _minmax(torch.cat([p for p, _ in self._test_parts]))
        texts = [t for _, t in self._test_parts]
        self._test_parts = []
        if any(t is None for t in texts) or not self.text_score_weight:
            return peak
        w = self.text_score_weight
        return (1 - w) * peak + w * _minmax(torch.cat(texts))


def _float32(device: torch.device):
    """A block without autocast: the lookup, losses, maps and text run in float32."""
    return torch.autocast(device.type, enabled=False)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    return (x - x.min()) / (x.max() - x.min() + 1e-6)


def _holdout_key(meta: dict[str, Any]) -> str:
    """A training image's identity for the hold-out split: category and file name (the same on
    every machine)."""
    name = str(meta.get("path", "")).replace("\\", "/").rsplit("/", 1)[-1]
    return f"{meta.get('category')}/{name}"
