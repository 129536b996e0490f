"""CASL speed: our plain-torch sparse convolutions vs spconv 2.x (the maintained library on the
package index), and CASL end to end (training and inference points per second, split into input
preparation and network) on the CPU and on a GPU when there is one.

spconv is optional: the comparison runs when ``import spconv.pytorch`` works (``make perf``
installs the CPU wheel into ``.venv-perf``) and is recorded as skipped otherwise.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import itertools
import os
import platform
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

import bench.adapters.casl as casl_module
from bench.adapters.casl import CASL
from bench.adapters.casl.sparse import SparseTensor, SubmanifoldConv, VoxelGrid, voxelize
from bench.datasets.synthetic_real3d import _shape
from bench.perf import save
from bench.training import amp_dtype
from bench.types import Batch

#: CASL's CPU schedule network (the paper's MinkUNet34C widths are CASL's defaults)
SMALL = dict(
    encoder_channels=(16, 16, 32, 32),
    decoder_channels=(32, 32, 16, 16),
    layers=(1,) * 8,
    stem_channels=16,
    stem_kernel=3,
)
NETWORKS = {"paper (MinkUNet34C widths)": {}, "small (CPU schedule)": SMALL}
#: where wheels brought to a machine are looked for (plus ADBENCH_WHEELS, colon-separated)
WHEEL_DIRS = ("/tmp/spc", "~/wheels", "wheels")


# -- machine -----------------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine() -> dict:
    info = {
        "date": datetime.date.today().isoformat(),
        "cpu": f"{_cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        info["spconv"] = importlib.metadata.version("spconv")
        info["cumm"] = importlib.metadata.version("cumm")
    except importlib.metadata.PackageNotFoundError:
        info["spconv"] = None
    return info


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _best(fn: Callable[[], object], repeats: int = 3, device="cpu") -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


# -- spconv availability and wheels -------------------------------------------------------------
def _spconv():
    try:
        import spconv.pytorch as spconv
    except Exception as err:  # ImportError, or a broken binary
        return None, f"spconv not installed ({type(err).__name__}: {err})"
    return spconv, None


def _wheels() -> dict:
    """Wheel files of spconv and cumm found on this machine, and their installed sizes."""
    dirs = [*os.environ.get("ADBENCH_WHEELS", "").split(":"), *WHEEL_DIRS]
    out = {}
    for name in ("spconv", "cumm"):
        row: dict = {"wheels": {}}
        for d in dirs:
            folder = Path(d).expanduser()
            if d and folder.is_dir():
                for whl in sorted(folder.glob(f"{name}-*.whl")):
                    row["wheels"][whl.name] = whl.stat().st_size
        try:
            dist = importlib.metadata.distribution(name)
            row["version"] = dist.version
            prefix = f"{name}-{dist.version}-"  # the wheel of the installed release only
            row["wheels"] = {k: v for k, v in row["wheels"].items() if k.startswith(prefix)}
            row["installed_bytes"] = sum(
                (f.size or 0) for f in (dist.files or []) if f.size is not None
            )
            row["requires"] = dist.requires or []
        except importlib.metadata.PackageNotFoundError:
            row["version"] = None
        out[name] = row
    return out


# -- sparse convolution: ours vs spconv ---------------------------------------------------------
def _surface_voxels(clouds: int, shapes: int, points: int, voxel_size: float) -> torch.Tensor:
    """Voxels [V, 4] of ``clouds`` scenes, each ``shapes`` random ellipsoid surfaces in the unit
    cube (points drawn uniformly on the unit sphere, scaled and shifted)."""
    rng = np.random.default_rng(0)
    scenes = []
    for _ in range(clouds):
        parts = []
        for _ in range(shapes):
            v = rng.normal(size=(points, 3))
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            parts.append(v * rng.uniform(0.15, 0.45, 3) + rng.uniform(-0.4, 0.4, 3))
        scenes.append(torch.tensor(np.concatenate(parts), dtype=torch.float32))
    return voxelize(scenes, voxel_size)[0]


def _error_text(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.line}" for f in frames[-3:][::-1])
    return f"{type(err).__name__}: {err} (at {where})"


def _direct(coords: torch.Tensor, feats: torch.Tensor, weight: torch.Tensor, rows) -> torch.Tensor:
    """A 3x3x3 convolution's output at ``rows``, summed neighbour by neighbour through a Python
    dict of coordinates (float64): a reference sharing no code with either implementation."""
    table = {tuple(c): i for i, c in enumerate(coords.tolist())}
    f, w = feats.double().cpu(), weight.double().cpu()
    out = torch.zeros(len(rows), w.shape[2], dtype=torch.float64)
    for n, r in enumerate(rows.tolist()):
        b, x, y, z = coords[r].tolist()
        for k, (dx, dy, dz) in enumerate(itertools.product((-1, 0, 1), repeat=3)):
            j = table.get((b, x + dx, y + dy, z + dz))
            if j is not None:
                out[n] += f[j] @ w[k]
    return out


def _gap(outputs: list[torch.Tensor], reference: torch.Tensor, rows=None) -> float:
    """Largest |output - reference| over every output (at ``rows`` when given)."""
    return max(
        float((o.double().cpu()[rows if rows is not None else slice(None)] - reference).abs().max())
        for o in outputs
    )


def _conv_comparison(coords: torch.Tensor, channels: int, spconv, device: str) -> dict:
    torch.manual_seed(0)
    ours = SubmanifoldConv(channels, channels).to(device)
    coords = coords.to(device)
    feats = torch.randn(len(coords), channels, device=device)
    grad = torch.randn(len(coords), channels, device=device)
    grid = VoxelGrid(coords)
    row: dict = {"voxels": len(coords), "channels": channels, "device": device}
    sample = torch.randperm(len(coords), generator=torch.Generator().manual_seed(0))[:256]
    direct = _direct(coords.cpu(), feats, ours.weight.detach(), sample)
    mine: list[torch.Tensor] = []  # every output, checked against the direct sum
    with torch.no_grad():
        row["ours_forward_with_maps_s"] = _best(
            lambda: mine.append(ours(SparseTensor(feats, VoxelGrid(coords))).feats), device=device
        )
        reference = ours(SparseTensor(feats, grid)).feats  # builds the grid's maps once
        row["ours_forward_s"] = _best(
            lambda: mine.append(ours(SparseTensor(feats, grid)).feats), device=device
        )
    row["ours_vs_direct"] = _gap([reference, *mine], direct, sample)

    def ours_backward():
        x = feats.clone().requires_grad_()
        out = ours(SparseTensor(x, grid)).feats
        _sync(device)
        start = time.perf_counter()
        out.backward(grad)
        _sync(device)
        return time.perf_counter() - start

    row["ours_backward_s"] = min(ours_backward() for _ in range(3))
    if spconv is None:
        return row

    theirs = spconv.SubMConv3d(channels, channels, 3, bias=False, indice_key="subm")
    layout = tuple(theirs.weight.shape)
    row["spconv_weight_shape"] = list(layout)
    # ours: [27, Cin, Cout], offsets (dx, dy, dz) with x slowest; spconv 2.x: [Cout, kx, ky, kz, Cin]
    w = ours.weight.detach().reshape(3, 3, 3, channels, channels).permute(4, 0, 1, 2, 3)
    try:
        if layout != tuple(w.shape):
            raise ValueError(f"spconv weight is {list(layout)}, expected [Cout, k, k, k, Cin]")
        with torch.no_grad():
            theirs.weight.copy_(w.cpu())
        theirs = theirs.to(device)
        spatial = (coords[:, 1:].max(0).values + 1).tolist()
        batch = int(coords[:, 0].max()) + 1
        indices = coords.int()

        def fresh():
            return spconv.SparseConvTensor(feats, indices, spatial, batch)

        outs: list[torch.Tensor] = []
        with torch.no_grad():
            row["spconv_forward_with_maps_s"] = _best(
                lambda: outs.append(theirs(fresh()).features), device=device
            )
            tensor = fresh()
            outs.append(theirs(tensor).features)  # the tensor keeps its pairs under indice_key
            row["spconv_forward_s"] = _best(
                lambda: outs.append(theirs(tensor).features), device=device
            )
        row["spconv_vs_direct"] = _gap(outs, direct, sample)
        row["max_abs_difference"] = _gap(outs, reference.double().cpu())  # over every call
        row["max_abs_output"] = float(reference.abs().max())
        row["outputs_agree"] = row["max_abs_difference"] <= 1e-4 * max(row["max_abs_output"], 1)
    except Exception as err:
        row["spconv_forward_error"] = _error_text(err)
        return row
    x = feats.clone().requires_grad_()
    try:
        out = theirs(spconv.SparseConvTensor(x, indices, spatial, batch)).features
        _sync(device)
        start = time.perf_counter()
        out.backward(grad)
        _sync(device)
        row["spconv_backward_s"] = time.perf_counter() - start
    except Exception as err:
        row["spconv_backward_error"] = _error_text(err)
    return row


# -- CASL end to end ------------------------------------------------------------------------------
class _PrepTimer:
    """Wraps the CASL module's ``prepared_inputs`` (curvature kNN + synthesis) to time it."""

    def __init__(self, device: str) -> None:
        self.device, self.seconds, self._orig = device, 0.0, casl_module.prepared_inputs

    def __enter__(self):
        def timed(*args, **kwargs):
            _sync(self.device)
            start = time.perf_counter()
            out = self._orig(*args, **kwargs)
            _sync(self.device)
            self.seconds += time.perf_counter() - start
            return out

        casl_module.prepared_inputs = timed
        return self

    def __exit__(self, *exc) -> None:
        casl_module.prepared_inputs = self._orig


def _end_to_end(kwargs: dict, clouds: list[torch.Tensor], device: str, steps: int) -> dict:
    torch.manual_seed(0)
    det = CASL(**kwargs)
    det.to(device)
    points = [c.to(device) for c in clouds]
    batch = Batch(label=torch.zeros(len(points), dtype=torch.long), points=points)
    det.build(batch)
    det.to(device)
    optimizer, _ = det.configure_optimizers()
    dtype = amp_dtype(torch.device(device), det.amp)
    n = sum(len(c) for c in clouds)
    row: dict = {
        "parameters": sum(p.numel() for p in det.net_.parameters()),
        "amp": str(dtype).replace("torch.", "") if dtype is not None else "off",
    }
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    det.net_.train()
    for phase, step in (("pretrain", 0), ("finetune", det.pretrain_iterations)):
        times, preps = [], []
        for i in range(steps + 1):  # the first is a warm-up
            with _PrepTimer(device) as prep:
                _sync(device)
                start = time.perf_counter()
                ctx = torch.autocast("cuda", dtype=dtype) if dtype is not None else nullcontext()
                with ctx:
                    loss = det.training_step(batch, step + i)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                _sync(device)
                elapsed = time.perf_counter() - start
            if i:
                times.append(elapsed)
                preps.append(prep.seconds)
        step_s, prep_s = float(np.median(times)), float(np.median(preps))
        row[phase] = {
            "step_s": step_s,
            "input_preparation_s": prep_s,
            "network_s": step_s - prep_s,
            "points_per_second": n / step_s,
        }
    det.net_.eval()
    det.point_scores(points)  # warm-up
    best, best_prep = float("inf"), 0.0
    for _ in range(steps):
        with _PrepTimer(device) as prep:
            _sync(device)
            start = time.perf_counter()
            det.point_scores(points)
            _sync(device)
            elapsed = time.perf_counter() - start
        if elapsed < best:
            best, best_prep = elapsed, prep.seconds
    row["inference"] = {
        "step_s": best,
        "input_preparation_s": best_prep,
        "network_s": best - best_prep,
        "points_per_second": n / best,
    }
    if device == "cuda":
        row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return row


# -- report ----------------------------------------------------------------------------------------
def _conv_lines(rows: list[dict], skipped: str | None) -> list[str]:
    lines = [
        "| device | voxels | channels | ours fwd (maps built) | ours fwd | ours bwd "
        "| spconv fwd (pairs built) | spconv fwd | spconv bwd | ours vs spconv "
        "| ours vs direct | spconv vs direct |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:

        def s(key, r=r):
            return f"{r[key]:.3f} s" if key in r else "—"

        if "spconv_backward_s" in r:
            bwd = s("spconv_backward_s")
        elif "spconv_backward_error" in r:
            bwd = "fails (below)"
        else:
            bwd = "—"
        diff = (
            f"{r['max_abs_difference']:.1e} (of {r['max_abs_output']:.1f})"
            if "max_abs_difference" in r
            else "—"
        )
        checks = " | ".join(
            f"{r[key]:.1e}" if key in r else "—" for key in ("ours_vs_direct", "spconv_vs_direct")
        )
        lines.append(
            f"| {r['device']} | {r['voxels']:,} | {r['channels']} | "
            f"{s('ours_forward_with_maps_s')} | {s('ours_forward_s')} | {s('ours_backward_s')} | "
            f"{s('spconv_forward_with_maps_s')} | {s('spconv_forward_s')} | {bwd} | {diff} | "
            f"{checks} |"
        )
    if skipped:
        lines += ["", f"spconv: {skipped}; its columns are skipped."]
    return lines


def _who_is_wrong(rows: list[dict]) -> str:
    """Which implementation the independent float64 sum sides with, over the given rows."""
    ours = max(r.get("ours_vs_direct", float("nan")) for r in rows)
    theirs = max(r.get("spconv_vs_direct", float("nan")) for r in rows)
    return (
        f"against the direct float64 sum ours is off by at most {ours:.1e} and spconv by "
        f"{theirs:.1e}; the largest differences over every timed call come from spconv calls "
        "that returned other values for the same input."
        if ours < 1e-4
        else f"ours is off the direct sum by {ours:.1e}, spconv by {theirs:.1e}."
    )


def _decision(rows: list[dict], wheels: dict, skipped: str | None) -> list[str]:
    cpu = [r for r in rows if r["device"] == "cpu"]
    lines = ["", "**Choice: the plain-torch sparse ops** (`bench/adapters/casl/sparse.py`)."]
    if skipped:
        return lines + [f"spconv was not measured here ({skipped})."]
    ratio = [r["ours_forward_s"] / r["spconv_forward_s"] for r in cpu if "spconv_forward_s" in r]
    if ratio:
        agree = all(r.get("outputs_agree") for r in cpu if "spconv_forward_s" in r)
        lines.append(
            f"On the CPU ours takes {'-'.join(sorted({f'{v:.1f}' for v in (min(ratio), max(ratio))}))}x "
            "spconv's forward time "
            "(maps reused); the outputs "
            + (
                "agree to float32 rounding with the weights copied into spconv's layout."
                if agree
                else "do NOT agree (see the difference column): " + _who_is_wrong(cpu)
            )
        )
    errors = [r["spconv_backward_error"] for r in cpu if "spconv_backward_error" in r]
    if errors:
        lines.append(
            "But the CPU wheel cannot train: its backward pass asks for the current CUDA stream "
            f"(`torch.cuda.current_stream()`) and raises `{errors[0].split(' (at ')[0]}`. "
            "CASL trains, so on a CPU it needs a backward pass; ours comes from autograd and "
            "runs on the CPU, on CUDA and under autocast with the same code."
        )
    sizes = []
    for row in wheels.values():
        for whl, size in row["wheels"].items():
            sizes.append(f"{whl} {size / 1e6:.2f} MB")
    if sizes:
        lines.append(
            "Wheels found here: " + "; ".join(sizes) + " (spconv also pulls pccm, ccimport, "
            "pybind11, fire, ninja and their dependencies). The CPU wheel has no CUDA kernels: "
            "a GPU needs one of the separate spconv-cuXXX packages, built per CUDA release."
        )
    return lines


def main(output: str, quick: bool = False) -> None:
    machine = _machine()
    spconv, skipped = _spconv()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    if quick:
        coords = _surface_voxels(clouds=2, shapes=2, points=4000, voxel_size=0.02)
        n_clouds, n_points, steps = 2, 1000, 1
    else:
        coords = _surface_voxels(clouds=4, shapes=3, points=10000, voxel_size=0.015)
        n_clouds, n_points, steps = 4, 8000, 3
    conv_rows = [_conv_comparison(coords, c, spconv, d) for d in devices for c in (32, 96)]
    for r in conv_rows:
        print({k: v for k, v in r.items() if not k.endswith("_error")}, flush=True)

    clouds = [
        torch.from_numpy(_shape(np.random.default_rng(i), n_points)).float()
        for i in range(n_clouds)
    ]
    end_to_end: dict = {}
    for device in devices:
        for name, kwargs in NETWORKS.items():
            row = _end_to_end(kwargs, clouds, device, steps)
            end_to_end.setdefault(device, {})[name] = row
            print(device, name, row, flush=True)

    wheels = _wheels()
    results = {
        "machine": machine,
        "quick": quick,
        "sparse_conv": {"voxels": len(coords), "kernel": 3, "rows": conv_rows, "skipped": skipped},
        "end_to_end": {
            "clouds": n_clouds,
            "points_per_cloud": n_points,
            "timed_steps": steps,
            "networks": {k: v or "CASL defaults" for k, v in NETWORKS.items()},
            "results": end_to_end,
        },
        "wheels": wheels,
    }
    gpu = machine["gpu"] or "none"
    lines = [
        f"# CASL speed ({machine['date']}{', quick run' if quick else ''})",
        "",
        f"CPU: {machine['cpu']}. GPU: {gpu}. torch {machine['torch']}, spconv "
        f"{machine['spconv'] or 'not installed'}. Command: `make perf` "
        "(`python -m bench.perf casl`).",
        "",
        "## Sparse convolution: ours (plain torch) vs spconv 2.x",
        "",
        f"A 3x3x3 submanifold convolution on {len(coords):,} occupied voxels (random ellipsoid "
        "surfaces, batch of "
        f"{int(coords[:, 0].max()) + 1}), the same weights in both; best of 3. "
        '"maps built": a fresh voxel grid / SparseConvTensor, so the neighbour maps (ours) or '
        "index pairs (spconv) are built inside the timing; otherwise they are reused, as every "
        "layer after the first of a forward pass does. spconv 2.x keeps its weight as "
        f"{conv_rows[0].get('spconv_weight_shape', '[Cout, k, k, k, Cin]')} = "
        "[Cout, kx, ky, kz, Cin]; ours is [k^3, Cin, Cout] with x the slowest offset. "
        "Differences are the largest |a - b| over every timed call (of the largest |output|); "
        '"direct" is a float64 neighbour-by-neighbour sum through a Python dict of '
        "coordinates at 256 random voxels, sharing no code with either implementation.",
        "",
        *_conv_lines(conv_rows, skipped),
    ]
    errors = {r["spconv_backward_error"] for r in conv_rows if "spconv_backward_error" in r}
    for e in errors:
        lines += ["", f"spconv backward on the CPU: `{e}`"]
    lines += _decision(conv_rows, wheels, skipped)
    lines += [
        "",
        "## CASL end to end",
        "",
        f"A batch of {n_clouds} generated clouds of {n_points:,} points "
        "(`synthetic_real3d._shape`); one optimiser step = `training_step` + backward + Adam "
        f"(median of {steps} after a warm-up), inference = `point_scores` (best of {steps}). "
        "Input preparation = normalisation, curvature kNN and (fine-tuning) the pseudo-anomaly "
        "(`prepared_inputs`); network = the rest (voxelisation, forward, loss, backward, "
        "optimiser). CUDA training runs under the autocast that `fit` uses.",
        "",
        "| device | network | phase | seconds | input prep | network | points/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for device, nets in end_to_end.items():
        for name, row in nets.items():
            for phase in ("pretrain", "finetune", "inference"):
                r = row[phase]
                lines.append(
                    f"| {device} | {name} | {phase} | {r['step_s']:.2f} | "
                    f"{r['input_preparation_s']:.2f} | {r['network_s']:.2f} | "
                    f"{r['points_per_second']:,.0f} |"
                )
    save(output, "casl", results, "\n".join(lines))
    print("\n".join(lines))
