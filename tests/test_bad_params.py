"""Detector parameters checked before any job starts (issue 29, item 2 and the parameter items).

Every parameter of dinomaly, dictas and casl is tried with a wrong type and, where its type hint
has a range, a list length or a set of choices, a value outside them; the tables are checked
against the constructors' signatures, so a new parameter without a case fails here. Then what a
hint cannot express (``Detector.validate_params``): unknown backbone and encoder names with a
did-you-mean (offline, against timm's and open_clip's registries), pretrained tags, layers beyond
the encoder's depth, warmup > iterations, and feature_stats fitted on one shot. Planning only:
nothing is fitted.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest

from bench.cli import main
from bench.config import BenchConfig, ConfigError, DatasetEntry, DetectorEntry
from bench.params import Length, Range, param_hints
from bench.plan import plan_jobs
from bench.registry import get_detector_class

#: a cheap valid configuration per detector (offline substitutes, random weights) and its data
BASE: dict[str, dict[str, Any]] = {
    "dinomaly": {"encoder": "efficientnet_lite0", "weights": "random"},
    "dictas": {"backbone": "efficientnet_lite0", "weights": "random"},
    "casl": {},
    "knn": {"backbone": "efficientnet_lite0", "weights": "random"},
    "feature_stats": {"weights": "random"},
    "curvature": {},
}
DATA = {"casl": "builtin_points", "curvature": "builtin_points"}
SCOPE = {"dictas": {"train_on": "builtin_ad", "shots": 2}}

#: parameter -> (a value of the wrong type, a value outside its range / length / choices or
#: None where the hint has none)
CASES: dict[str, dict[str, tuple[Any, Any]]] = {
    "dinomaly": {
        "variant": (2, "dinomaly3"),
        "inputs": (1, "depth"),
        "rgb_weight": ("half", 1.5),
        "depth_fill": (1.5, -1),
        "encoder": (5, "no_such_net"),
        "weights": (1, "imagenet"),
        "layers": ("0,1", [0, -1]),
        "encoder_depth": ("deep", 0),
        "decoder_depth": (2.5, 0),
        "decoder_heads": ("8", 0),
        "dropout": ("x", 1.0),
        "narrow": ("x", 0),
        "attention_eps": ("x", -1),
        "iterations": (1.5, 0),
        "lr": ("fast", 0),
        "lr_final": ("x", -1),
        "narrow_lr": ("x", 0),
        "warmup": (1.5, -1),
        "weight_decay": ("x", -0.1),
        "amsgrad": ("yes", None),
        "eps": ("x", -1),
        "grad_clip": ("x", -1),
        "hard_mining": ("x", 1.5),
        "hard_mining_ramp": (0.5, -1),
        "hard_factor": ("x", 2),
        "recentre": (1, None),
        "map_size": ("x", 0),
        "smoothing_kernel": (1.5, 0),
        "sigma": ("x", -1),
        "top_fraction": ("x", 0),
        "compile": ("no", None),
        "amp": (16, "fp8"),
        "checkpoint_every": (1.5, 0),
    },
    "dictas": {
        "backbone": (5, "no_such_net"),
        "weights": (1, "imagenet"),
        "input_size": ("big", 8),
        "layers": ("1", [0]),
        "test_layers": ("1", []),
        "scales": (1, []),
        "backbone_depth": ("x", 0),
        "backbone_width": ("x", 4),
        "heads": ("x", 0),
        "dropout": ("x", 1),
        "epochs": (1.5, 0),
        "lr": ("x", 0),
        "betas": (0.5, [0.9, 1.0]),
        "plateau_factor": ("x", 1),
        "plateau_patience": (0.5, -1),
        "anomaly_probability": ("x", 1.5),
        "reference_augmentation": ("x", -0.1),
        "textures": (3, None),
        "contrastive_weight": ("x", -1),
        "text_weight": ("x", -1),
        "val_fraction": ("x", 1),
        "val_images": (1.5, 0),
        "test_mode": (1, "both"),
        "sigma": ("x", -1),
        "text_score_weight": ("x", 2),
        "score_normalisation": (1, "global"),
        "rotated_references": ("screw", None),
        "all_layers_categories": ("screw", None),
        "training_free": ("yes", None),
        "seed": ("x", None),
        "amp": (16, "fp8"),
        "checkpoint_every": (1.5, 0),
    },
    "casl": {
        "voxel_size": ("big", 0),
        "ks": ("16", []),
        "encoder_channels": (32, [32, 64, 128]),
        "decoder_channels": (32, [0, 1, 1, 1]),
        "layers": (2, [1] * 7),
        "stem_channels": ("x", 0),
        "stem_kernel": (1.5, 0),
        "pretrain_iterations": (1.5, -1),
        "finetune_iterations": (1.5, 0),
        "lr": ("x", 0),
        "weight_decay": ("x", -1),
        "lr_schedule": (1, "linear"),
        "patch_parts": ("many", 1),
        "displacement": (0.1, [-0.1, 0.1]),
        "rotate": (True, "xy"),
        "partial_views": ("x", 1.5),
        "density_jitter": ("x", 1),
        "neighbourhoods": (1, "radius"),
        "max_points": (1.5, 8),
        "top_fraction": ("x", 0),
        "sigma": ("x", -1),
        "knn": (1, "faiss"),
        "amp": (16, "fp8"),
        "grad_clip": ("x", -1),
        "checkpoint_every": (1.5, 0),
    },
}

#: what only Detector.validate_params catches: (detector, params, the message after "= ...")
HOOK_CASES = [
    ("knn", {"backbone": "wide_resnet50"}, "is not a timm model; did you mean 'wide_resnet50_2'?"),
    ("knn", {"layers": [2, 7]}, "are not feature stages of efficientnet_lite0 (0..4"),
    ("feature_stats", {"backbone": "resnet18.no_tag"}, "pretrained tag 'no_tag' that timm"),
    ("feature_stats", {"weights": "pretrainde"}, "did you mean 'pretrained'?"),
    ("dinomaly", {"encoder": "vit_small_patch14_reg4_dinov"}, "did you mean 'vit_small_patch14"),
    ("dinomaly", {"encoder": "vit_base_patch14_reg4_dinov2.lvd142"}, "did you mean 'lvd142m'?"),
    ("dinomaly", {"encoder": "resnet18"}, "is not a timm VisionTransformer"),
    ("dinomaly", {"warmup": 10, "iterations": 5}, "is more than iterations = 5"),
    ("dinomaly", {"warmup": 50000, "variant": "dinomaly2"}, "is more than iterations = 40000"),
    ("dinomaly", {"decoder_depth": 3}, "must be even (two groups)"),
    ("dinomaly", {"layers": [0, 1, 2]}, "must be an even number of blocks"),
    ("dinomaly", {"layers": [0, 8]}, "are not blocks of efficientnet_lite0 (0..7)"),
    ("dinomaly", {"decoder_heads": 3}, "does not divide efficientnet_lite0's width 128"),
    ("dinomaly", {"smoothing_kernel": 4}, "must be odd"),
    ("dinomaly", {"narrow_lr": 1e-3}, "applies only to a narrow bottleneck"),
    (
        "dinomaly",
        {"encoder": "vit_small_patch14_reg4_dinov2", "weights": "pretrained", "encoder_depth": 2},
        "applies only to weights='random' or a checkpoint file",
    ),
    ("dictas", {"backbone": "ViT-L-14-33"}, "did you mean 'ViT-L-14-336'?"),
    ("dictas", {"backbone": "ViT-L-14-336", "weights": "opena"}, "did you mean 'openai'?"),
    ("dictas", {"layers": [100]}, "are not blocks of efficientnet_lite0 (1..8)"),
    ("dictas", {"backbone": "ViT-B-16", "layers": [100]}, "are not blocks of ViT-B-16 (1..12)"),
    ("dictas", {"heads": 3}, "does not divide efficientnet_lite0's width 128"),
    ("dictas", {"backbone_depth": 2}, "does not apply to efficientnet_lite0"),
    ("dictas", {"backbone_width": 64}, "applies only to an open_clip backbone"),
    ("casl", {"displacement": [0.12, 0.06]}, "must be (low, high) with low <= high"),
    ("casl", {"patch_parts": [64, 8]}, "must be (low, high) with low <= high"),
]


def _cfg(tmp_path: Path, detector: str, params: dict[str, Any], **kw) -> BenchConfig:
    entry = DetectorEntry(detector, params={**BASE[detector], **params}, **SCOPE.get(detector, {}))
    return BenchConfig(
        name="params",
        detectors=[entry],
        datasets=[DatasetEntry(DATA.get(detector, "builtin_ad"), image_size=64)],
        num_workers=0,
        output=str(tmp_path / "out"),
        **kw,
    )


def _refused(tmp_path: Path, detector: str, params: dict[str, Any], **kw) -> str:
    """The one-line message plan_jobs refuses ``params`` with (nothing written)."""
    with pytest.raises(ConfigError) as err:
        plan_jobs(_cfg(tmp_path, detector, params, **kw))
    message = str(err.value)
    assert "\n" not in message and not (tmp_path / "out").exists()
    return message


def _constrained(hint: Any) -> bool:
    """Whether a type hint restricts values beyond their type: a Range, a Length or choices."""
    if typing.get_origin(hint) is typing.Literal:
        return True
    if typing.get_origin(hint) is typing.Annotated:
        if any(isinstance(m, (Range, Length)) for m in hint.__metadata__):
            return True
    return any(_constrained(a) for a in typing.get_args(hint))


@pytest.mark.parametrize("detector", sorted(CASES))
def test_every_parameter_has_its_cases(detector):
    """A parameter added to a constructor without a case here fails; so does a constrained
    parameter without an out-of-range case (or a model name without an unknown one)."""
    cls = get_detector_class(detector)
    assert set(CASES[detector]) == set(cls.param_names())
    hints = param_hints(cls)
    for name, (_, out_of_range) in CASES[detector].items():
        named = name in ("backbone", "encoder", "weights")  # known names: validate_params
        assert (out_of_range is not None) == (_constrained(hints[name]) or named), name


@pytest.mark.parametrize("detector", sorted(BASE))
def test_the_base_configurations_plan(tmp_path, detector):
    """The cases below differ from a configuration that plans."""
    assert plan_jobs(_cfg(tmp_path, detector, {}))


@pytest.mark.parametrize(
    ("detector", "name", "kind"),
    [
        (d, n, k)
        for d in sorted(CASES)
        for n in CASES[d]
        for k in (0, 1)
        if CASES[d][n][k] is not None
    ],
)
def test_a_bad_value_of_every_parameter_is_refused_at_plan_time(tmp_path, detector, name, kind):
    value = CASES[detector][name][kind]
    message = _refused(tmp_path, detector, {name: value})
    assert message.startswith(f"detector '{detector}': parameter {name} = {value!r}"), message


@pytest.mark.parametrize("detector", sorted(CASES))
def test_an_unknown_parameter_name_is_refused_with_a_did_you_mean(tmp_path, detector):
    name = next(iter(CASES[detector]))
    message = _refused(tmp_path, detector, {name + "x": 1})
    assert message.startswith(f"detector '{detector}': unknown parameter(s) ['{name}x']")
    assert f"did you mean '{name}'?" in message


@pytest.mark.parametrize(("detector", "params", "expected"), HOOK_CASES)
def test_what_a_hint_cannot_say_is_refused_at_plan_time(tmp_path, detector, params, expected):
    message = _refused(tmp_path, detector, params)
    assert message.startswith(f"detector '{detector}': parameter "), message
    assert expected in message


def test_casl_empty_ks_and_dictas_layer_100(tmp_path):
    """The two shape parameters users met failing per job ("max() arg is an empty sequence")."""
    for detector in ("casl", "curvature"):
        assert _refused(tmp_path, detector, {"ks": []}) == (
            f"detector '{detector}': parameter ks = [] is not valid; expected a non-empty list "
            "of integers, each >= 3"
        )
    assert _refused(tmp_path, "dictas", {"backbone": "ViT-L-14-336", "layers": [100]}) == (
        "detector 'dictas': parameter layers = [100] are not blocks of ViT-L-14-336 (1..24)"
    )


def test_feature_stats_needs_two_shots(tmp_path):
    """One image has no variance: every job used to fail late with NaN maps."""
    message = _refused(tmp_path, "feature_stats", {}, shots=1)
    assert message.startswith(
        "detector 'feature_stats' (feature_stats) needs at least 2 training images per fit, but "
        "shots = 1 gives 1 (builtin_ad/"
    )
    assert message.endswith("use shots >= 2")
    assert plan_jobs(_cfg(tmp_path, "feature_stats", {}, shots=2))
    # pooled over both categories, one shot each is two images
    assert plan_jobs(_cfg(tmp_path, "feature_stats", {}, shots=1, scope="unified"))


def test_the_cli_names_an_unknown_backbone_before_any_job(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["run", "--detectors", "knn", "--datasets", "builtin_ad", "--no-tracking"]
    assert main([*args, "--output", str(out), "--param", "knn.backbone=no_such_net"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "bench: error: detector 'knn': parameter backbone = 'no_such_net' is not a timm model; "
        "did you mean 'wide_resnet50_2' (the default)?\n"
    )
    assert not out.exists(), "nothing ran"
