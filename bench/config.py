"""Benchmark configuration: a TOML file (or a built-in name) merged with CLI flags.

```toml
name = "default"            # results/<name>/, MLflow experiment "adbench/<name>"
seeds = [0]
device = "auto"             # auto | cpu | cuda | cuda:1
batch_size = 8
protocol = "official"       # official | fast

[[detectors]]
name = "feature_stats"      # a registered detector
label = "feature_stats"     # optional: row name in the leaderboard (defaults to name)
params = { sigma = 4.0 }    # overrides of the paper defaults
datasets = ["builtin_ad"]   # optional: default = every dataset that feeds its modality
image_size = 256            # optional: the detector's own input size (default: the dataset's)
crop_size = 224             # optional: its own centre crop ("none": no crop)
resampling = "tensor"       # optional: how images are resized (default: the detector's official
                            # one; tensor | pil-bilinear | pil-bicubic, see bench.datasets.common)
batch_size = 16             # optional: its own batch size (default: the top-level one)

[[datasets]]
name = "mvtec_ad"
root = "/data/mvtec_ad"     # optional for built-in data and when MVTEC_AD_ROOT is set
categories = ["bottle"]     # optional: default = every category found
image_size = 256
crop_size = 224             # optional
```

Fit scopes (which training images a fit receives; see bench.scopes), top level or per detector:

```toml
scope = "unified"           # per_category (default) | unified: one fit over every category
train_on = "visa:candle,pcb1"   # fit on another dataset's training split (or a table:
                            # { dataset = "visa", root = "...", categories = [...] })
shots = 4                   # k normal training images per category ...
shot_draws = 5              # ... drawn 5 times (seeded by category and draw index; <= 1000)
shot_files = ["refs.txt"]   # or the reference images listed in files, one file per draw
train_log_every = 1         # trained detectors log loss, lr and images/s every N steps
```

Where the jobs run (bench.executors):

```toml
executor = "ray"            # local (default): this process, one job at a time
ray_address = "head:6379"   # optional: a running Ray cluster (default: a local Ray instance)
gpus_per_job = 0.25         # optional: GPUs a job requests (a fraction from 0.0001 to 1: light
                            # jobs share one; or whole GPUs, at most 16); default 1 when the
                            # cluster has GPUs, else 0
cpus_per_job = 1            # CPUs a job requests (up to 1024; 0 only with gpus_per_job > 0)
max_retries = 3             # retries of a job whose worker was lost (0 to 100; its own errors:
                            # none)
```
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from bench import value_checks as checks
from bench.datasets.common import RESAMPLINGS
from bench.errors import ConfigError
from bench.metrics import PROTOCOLS
from bench.scopes import SCOPES, check_scope_fields
from bench.value_checks import Check, Naming, integer, one_of, optional

__all__ = ["BenchConfig", "ConfigError", "DatasetEntry", "DetectorEntry", "load_config"]

#: where jobs run (bench.executors): this process, or tasks on a Ray cluster
EXECUTORS = ("local", "ray")
#: the largest batch and the most data-loading workers: more is a typo
MAX_BATCH_SIZE, MAX_WORKERS = 65_536, 1024


@dataclass
class DetectorEntry:
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    label: str | None = None
    datasets: list[str] | None = None
    #: the detector's own input geometry (e.g. a paper's 256 -> crop 224); None = the dataset's,
    #: crop_size "none" = no crop
    image_size: int | list[int] | str | None = None
    crop_size: int | list[int] | str | None = None
    #: how the loaders resize its images (bench.datasets.common.RESAMPLINGS); None: the
    #: detector's own (``Detector.resampling``, its official code's)
    resampling: str | None = None
    #: its own batch size for training and testing (None: the benchmark's)
    batch_size: int | None = None
    #: fit scope overrides for this detector (None: the benchmark's own, see BenchConfig)
    scope: str | None = None
    train_on: str | dict[str, Any] | None = None
    shots: int | None = None
    shot_draws: int | None = None
    shot_files: list[str] | None = None

    @property
    def display(self) -> str:
        return self.label or self.name


@dataclass
class DatasetEntry:
    name: str
    root: str | None = None
    categories: list[str] | None = None
    image_size: int | list[int] | None = 256
    crop_size: int | list[int] | None = None
    #: loader options, e.g. ``{ preprocess = true }`` for MVTec 3D-AD background removal
    options: dict[str, Any] = field(default_factory=dict)


def flag(default: Any = None, *, help: str, group: str | None = None, **cli: Any) -> Any:
    """A config field that is also a ``bench run`` flag (``--field-name`` unless ``cli`` names
    another in ``flag``): the CLI builds its flags from these. ``cli`` holds argparse options,
    with ``type`` one of the CLI's value parsers ("int", "float", "seeds", "names", "value")."""
    meta = {"cli": {"help": help, "group": group, **cli}}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


#: the ``bench run`` flag groups of :func:`flag` fields
FLAG_GROUPS = {
    "fit scope": "which training images each fit receives (for every detector)",
    "executor": "where the jobs run (default: this process)",
}


@dataclass
class BenchConfig:
    name: str = flag("default", help="benchmark name: results/<name>/")
    detectors: list[DetectorEntry] = field(default_factory=list)
    datasets: list[DatasetEntry] = field(default_factory=list)
    seeds: list[int] = flag([0], type="seeds", help="comma-separated integer seeds, e.g. 0,1,2")
    #: keep only these categories, in whichever datasets have them (None: no filter)
    categories: list[str] | None = flag(
        type="names", help="comma-separated categories, kept in whichever datasets have them"
    )
    device: str = flag("auto", help="auto (default), cpu, cuda, cuda:N")
    batch_size: int = flag(8, type="int", help="batch size of every detector without its own")
    num_workers: int = flag(2, type="int", help="data-loading worker processes (default 2)")
    protocol: str = flag("official", choices=PROTOCOLS, help="metric protocol (default official)")
    output: str = flag("results", help="results folder (default: results)")
    #: resamples of the stratified bootstrap behind each job's 95% intervals (0: none)
    bootstrap: int = flag(
        1000,
        type="int",
        metavar="B",
        help="bootstrap resamples of each job's 95%% confidence intervals (default 1000; 0: none)",
    )
    bootstrap_seed: int = flag(
        0, type="int", metavar="SEED", help="seed of the bootstrap resamples (default 0)"
    )
    #: write every anomaly map (float32 tiff, native size, official layout) under this folder
    export_maps: str | None = flag(
        metavar="DIR",
        help="write every anomaly map to "
        "DIR/<detector>/<dataset>/seedN/<category>/test/<defect>/<id>.tiff",
    )
    experiment: str | None = flag(help="MLflow experiment name (default: adbench/<name>)")
    tracking_uri: str | None = flag(
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the local SQLite store)"
    )
    #: fit scope of every detector that does not set its own (bench.scopes)
    scope: str = flag(
        "per_category",
        group="fit scope",
        choices=SCOPES,
        help="per_category (default): a fit per category; unified: one fit over every category",
    )
    train_on: str | dict[str, Any] | None = flag(
        group="fit scope",
        metavar="DATASET[:CATEGORY,...]",
        help="fit on another dataset's training split (its root: --root DATASET=PATH)",
    )
    shots: int | None = flag(
        group="fit scope", type="int", help="k normal training images per category"
    )
    shot_draws: int = flag(
        1,
        group="fit scope",
        type="int",
        help="seeded draws of the k shots (default 1, at most 1000)",
    )
    shot_files: list[str] | None = flag(
        group="fit scope",
        flag="--shot-file",
        action="append",
        metavar="FILE",
        help="reference images listed in FILE (paths relative to the dataset root), one file "
        "per draw (repeatable)",
    )
    #: trained detectors log their loss, learning rate and throughput every N steps
    train_log_every: int = flag(
        1,
        group="fit scope",
        type="int",
        metavar="N",
        help="trained detectors log loss, lr and images/s to MLflow every N steps (default 1)",
    )
    #: where jobs run: "local" (this process) or "ray" (tasks on a Ray cluster)
    executor: str = flag(
        "local",
        group="executor",
        choices=EXECUTORS,
        help="local (default): one job at a time here; ray: each job a Ray task on a cluster",
    )
    #: the Ray cluster to join ("auto", "HOST:PORT", "ray://HOST:10001"); None: start a local one
    ray_address: str | None = flag(
        group="executor",
        flag="--address",
        metavar="ADDRESS",
        help="the Ray cluster to join (HOST:PORT, ray://HOST:10001, or auto: the one started on "
        "this machine); default: a new local Ray instance using every CPU and GPU here",
    )
    #: GPUs per Ray job (fractions share a GPU); None: 1 when the cluster has GPUs, else 0
    gpus_per_job: float | None = flag(
        group="executor",
        type="float",
        help="GPUs a Ray job requests (0.25: four jobs share a GPU; whole GPUs up to 16; "
        "default 1 on a cluster with GPUs, else 0)",
    )
    cpus_per_job: float = flag(
        1.0,
        group="executor",
        type="float",
        help="CPUs a Ray job requests (default 1; 0 only with --gpus-per-job > 0)",
    )
    #: retries of a Ray job whose worker process or node was lost
    max_retries: int = flag(
        3,
        group="executor",
        type="int",
        help="retries of a Ray job whose worker or node was lost (default 3, at most 100); a job "
        "failing by itself is recorded as failed, never retried",
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_TOP = {f for f in BenchConfig.__dataclass_fields__}


def _entries(raw: Any, cls: type, where: str) -> list:
    if not isinstance(raw, list):
        raise ConfigError(
            f"{where}: expected a list of tables ([[{where}]]), got {type(raw).__name__}"
        )
    out = []
    allowed = set(cls.__dataclass_fields__)
    for i, item in enumerate(raw):
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or "name" not in item:
            raise ConfigError(f"{where}[{i}]: expected a table with a 'name' field, got {item!r}")
        unknown = set(item) - allowed
        if unknown:
            raise ConfigError(
                f"{where}[{i}] ({item['name']}): unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}"
            )
        out.append(cls(**item))
    return out


def from_dict(raw: dict[str, Any], source: str = "config") -> BenchConfig:
    unknown = set(raw) - _TOP
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_TOP)}")
    raw = dict(raw)
    detectors = _entries(raw.pop("detectors", []), DetectorEntry, "detectors")
    datasets = _entries(raw.pop("datasets", []), DatasetEntry, "datasets")
    cfg = BenchConfig(detectors=detectors, datasets=datasets, **raw)
    validate(cfg, source)
    return cfg


#: each field's flag on the ``bench run`` command line
FLAGS = {
    f.name: f.metadata["cli"].get("flag", "--" + f.name.replace("_", "-"))
    for f in BenchConfig.__dataclass_fields__.values()
    if "cli" in f.metadata
}

#: the checks of the top-level fields (bench.value_checks; the scope fields: bench.scopes)
CHECKS: dict[str, Check] = {
    "name": checks.text,
    "seeds": checks.seeds,
    "batch_size": integer(1, MAX_BATCH_SIZE),
    "num_workers": integer(0, MAX_WORKERS),
    "protocol": one_of(PROTOCOLS),
    "bootstrap": checks.resamples,
    "bootstrap_seed": integer(0, 2**31 - 1),
    "train_log_every": integer(1),
    "executor": one_of(EXECUTORS),
    "ray_address": optional(checks.address),
    "gpus_per_job": optional(checks.gpus),
    "cpus_per_job": checks.cpus,
    "max_retries": integer(0, checks.MAX_RETRIES),
}


def validate(cfg: BenchConfig, source: str = "config", cli: bool = False) -> None:
    """Checks every field before anything runs; a ConfigError names the first bad one: its
    flag (``cli``: the config was merged with the command line's flags, after the file's own
    checks) or its key in ``source``."""
    name = Naming(source, FLAGS if cli else None)
    name.check(cfg, CHECKS)
    if not isinstance(cfg.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.device):
        raise ConfigError(
            f"{source}: device must be auto, cpu, cuda or cuda:N (or mps), got {cfg.device!r}"
        )
    if cfg.cpus_per_job == 0 and (not cfg.gpus_per_job or cfg.device == "cpu"):
        raise ConfigError(
            f"{name('cpus_per_job', 0)} is not valid without GPUs per job (every job would "
            "start at once); expected a number > 0, or 0 with gpus_per_job > 0 on a GPU device"
        )
    for det in cfg.detectors:
        where = f"{source}: detector {det.display!r}"
        Naming(where).check(det, DETECTOR_CHECKS)
        check_scope_fields(det, Naming(where))
        if det.resampling is not None and det.resampling not in RESAMPLINGS:
            raise ConfigError(
                f"{where} resampling must be one of {RESAMPLINGS} (or left out for the "
                f"detector's own), got {det.resampling!r}"
            )
        for key, words in (("image_size", ("native", "none")), ("crop_size", ("none", "native"))):
            _check_size(getattr(det, key), f"{where} {key}", words)
    for ds in cfg.datasets:
        for key, words in (("image_size", ("native", "none")), ("crop_size", ("none", "native"))):
            _check_size(getattr(ds, key), f"{source}: dataset {ds.name!r} {key}", words)
    check_scope_fields(cfg, name)
    labels = [d.display for d in cfg.detectors]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ConfigError(
            f"{source}: detector label(s) {dupes} appear twice; give each entry a distinct 'label'"
        )


#: the checks of a detector entry's own settings
DETECTOR_CHECKS: dict[str, Check] = {
    "batch_size": optional(integer(1, MAX_BATCH_SIZE)),
}


def _positive(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _check_size(value: Any, where: str, words: tuple[str, ...]) -> None:
    """An input size: a positive integer, [height, width] of positive integers, or a word."""
    ok = (
        value is None
        or value in words
        or _positive(value)
        or (isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_positive, value)))
    )
    if not ok:
        raise ConfigError(
            f"{where} must be a positive integer, [height, width] or {' / '.join(map(repr, words))}; "
            f"got {value!r}"
        )


def builtin_configs() -> list[str]:
    return sorted(
        p.name[:-5] for p in resources.files("bench.configs").iterdir() if p.name.endswith(".toml")
    )


def load_config(path_or_name: str | Path) -> BenchConfig:
    """Loads a TOML file, or a built-in config by name (see ``builtin_configs()``)."""
    path = Path(path_or_name)
    if path.is_file():
        text, source = path.read_text(), str(path)
    elif str(path_or_name) in builtin_configs():
        res = resources.files("bench.configs") / f"{path_or_name}.toml"
        text, source = res.read_text(), f"built-in config {path_or_name!r}"
    else:
        raise ConfigError(
            f"config {str(path_or_name)!r} is neither a file nor a built-in config ({', '.join(builtin_configs())})"
        )
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: invalid TOML: {err}") from err
    cfg = from_dict(raw, source)
    if not path.is_file():  # a built-in config's reference lists ship beside it
        for entry in [cfg, *cfg.detectors]:
            if entry.shot_files:
                entry.shot_files = [packaged_file(f) for f in entry.shot_files]
    return cfg


def packaged_file(name: str) -> str:
    """The path of a file shipped with the built-in configs (e.g. shots/dictas/...)."""
    return str(resources.files("bench.configs").joinpath(name))
