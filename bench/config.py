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
shot_draws = 5              # ... drawn 5 times (seeded by category and draw index)
shot_files = ["refs.txt"]   # or the reference images listed in files, one file per draw
train_log_every = 1         # trained detectors log loss, lr and images/s every N steps
```

Where the jobs run (bench.executors):

```toml
executor = "ray"            # local (default): this process, one job at a time
ray_address = "head:6379"   # optional: a running Ray cluster (default: a local Ray instance)
gpus_per_job = 0.25         # optional: GPUs a job requests (fractional: light jobs share one);
                            # default 1 when the cluster has GPUs, else 0
cpus_per_job = 1            # CPUs a job requests
max_retries = 3             # retries of a job whose worker was lost (its own errors: none)
```
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from bench.datasets.common import RESAMPLINGS
from bench.errors import ConfigError
from bench.metrics import PROTOCOLS
from bench.scopes import SCOPES, check_scope_fields

__all__ = ["BenchConfig", "ConfigError", "DatasetEntry", "DetectorEntry", "load_config"]

#: where jobs run (bench.executors): this process, or tasks on a Ray cluster
EXECUTORS = ("local", "ray")


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
        1, group="fit scope", type="int", help="seeded draws of the k shots (default 1)"
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
        help="GPUs a Ray job requests (0.25: four jobs share a GPU; default 1 on a cluster "
        "with GPUs, else 0)",
    )
    cpus_per_job: float = flag(
        1.0, group="executor", type="float", help="CPUs a Ray job requests (default 1)"
    )
    #: retries of a Ray job whose worker process or node was lost
    max_retries: int = flag(
        3,
        group="executor",
        type="int",
        help="retries of a Ray job whose worker or node was lost (default 3); a job failing "
        "by itself is recorded as failed, never retried",
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


def validate(cfg: BenchConfig, source: str = "config") -> None:
    if cfg.protocol not in PROTOCOLS:
        raise ConfigError(f"{source}: protocol must be one of {PROTOCOLS}, got {cfg.protocol!r}")
    if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise ConfigError(
            f"{source}: batch_size must be a positive integer, got {cfg.batch_size!r}"
        )
    if not cfg.seeds or not all(isinstance(s, int) for s in cfg.seeds):
        raise ConfigError(
            f"{source}: seeds must be a non-empty list of integers, got {cfg.seeds!r}"
        )
    if not isinstance(cfg.num_workers, int) or cfg.num_workers < 0:
        raise ConfigError(
            f"{source}: num_workers must be a non-negative integer, got {cfg.num_workers!r}"
        )
    if not isinstance(cfg.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.device):
        raise ConfigError(
            f"{source}: device must be auto, cpu, cuda or cuda:N (or mps), got {cfg.device!r}"
        )
    for det in cfg.detectors:
        if det.batch_size is not None and not _positive(det.batch_size):
            raise ConfigError(
                f"{source}: detector {det.display!r} batch_size must be a positive integer, "
                f"got {det.batch_size!r}"
            )
        if det.resampling is not None and det.resampling not in RESAMPLINGS:
            raise ConfigError(
                f"{source}: detector {det.display!r} resampling must be one of {RESAMPLINGS} "
                f"(or left out for the detector's own), got {det.resampling!r}"
            )
    for entry in (*cfg.detectors, *cfg.datasets):
        kind = "detector" if isinstance(entry, DetectorEntry) else "dataset"
        where = f"{source}: {kind} {getattr(entry, 'display', entry.name)!r}"
        _check_size(entry.image_size, f"{where} image_size", ("native", "none"))
        _check_size(entry.crop_size, f"{where} crop_size", ("none", "native"))
    for name in ("bootstrap", "bootstrap_seed"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
            raise ConfigError(
                f"{source}: {name} must be an integer from 0 to 2^31 - 1, got {value!r}"
            )
    if 0 < cfg.bootstrap < 50:
        raise ConfigError(
            f"{source}: bootstrap must be 0 (no intervals) or at least 50 resamples for a 95% "
            f"interval, got {cfg.bootstrap}"
        )
    if not _positive(cfg.train_log_every):
        raise ConfigError(
            f"{source}: train_log_every must be a positive integer, got {cfg.train_log_every!r}"
        )
    check_executor(cfg, source)
    check_scope_fields(cfg, f"{source}:")
    for det in cfg.detectors:
        check_scope_fields(det, f"{source}: detector {det.display!r}")
    labels = [d.display for d in cfg.detectors]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ConfigError(
            f"{source}: detector label(s) {dupes} appear twice; give each entry a distinct 'label'"
        )


def check_executor(cfg: BenchConfig, source: str) -> None:
    """The executor fields: a known executor and non-negative resource requests."""
    if cfg.executor not in EXECUTORS:
        raise ConfigError(f"{source}: executor must be one of {EXECUTORS}, got {cfg.executor!r}")

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0

    if cfg.gpus_per_job is not None and not number(cfg.gpus_per_job):
        raise ConfigError(
            f"{source}: gpus_per_job must be a number >= 0 (e.g. 0.5 to share a GPU), "
            f"got {cfg.gpus_per_job!r}"
        )
    if not number(cfg.cpus_per_job):
        raise ConfigError(f"{source}: cpus_per_job must be a number >= 0, got {cfg.cpus_per_job!r}")
    if not (isinstance(cfg.max_retries, int) and not isinstance(cfg.max_retries, bool)) or (
        cfg.max_retries < 0
    ):
        raise ConfigError(
            f"{source}: max_retries must be a non-negative integer, got {cfg.max_retries!r}"
        )
    if cfg.ray_address is not None and not (isinstance(cfg.ray_address, str) and cfg.ray_address):
        raise ConfigError(
            f"{source}: ray_address must be a cluster address such as 'auto' or 'HOST:6379', "
            f"got {cfg.ray_address!r}"
        )


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
