"""CASL's learning curve on 2 CPU cores: object and point AUROC, overall and per defect type,
against pretraining steps, fine-tuning steps and network width, next to ``curvature``.

Two datasets: the built-in clouds (``builtin_points``, the 8x6x4 cm ellipsoid with compact and
wide bulges and sinks) and a held-out vase (:mod:`bench.perf.casl_shapes`, a shape and defects
that no test uses). Every point of the curve is its own training run (the learning-rate
schedule depends on the run's length), seeded; runs go two at a time, one torch thread each.
Finished runs are kept in ``<output>/casl_curve.jsonl`` and skipped when the command is run
again, so an interrupted curve resumes where it stopped (after a change to the detector, delete
that file: its keys name the runs, not the code).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from bench.perf import save

#: the network widths measured: name -> CASL parameters
WIDTHS = {
    "small": dict(
        encoder_channels=(16, 16, 32, 32),
        decoder_channels=(32, 32, 16, 16),
        layers=(1,) * 8,
        stem_channels=16,
        stem_kernel=3,
    ),
    "medium": dict(
        encoder_channels=(32, 32, 64, 64),
        decoder_channels=(64, 64, 32, 32),
        layers=(1,) * 8,
        stem_channels=32,
        stem_kernel=3,
    ),
    "paper": {},  # MinkUNet34C widths and block counts, CASL's defaults
}
#: variants of the ``make bench`` schedule: what each of issue 25's changes is worth, and the
#: detector as it was before them
VARIANTS = {
    "": {},
    "PO3AD's voxel 0.03": dict(voxel_size=0.03),
    "PO3AD's patch 1/64": dict(patch_parts=64),
    "before issue 25": dict(
        voxel_size=0.03, patch_parts=64, neighbourhoods="count", density_jitter=0.0,
        weight_decay=1e-4, lr_schedule="constant",
    ),
}  # fmt: skip
#: every run: CPU subsamples of 4,000 points, batches of 4 clouds, the detector's defaults else
COMMON = dict(max_points=4000)
#: (width, pretraining steps, fine-tuning steps, seed) per dataset, the runs that matter most
#: first: three seeds of the ``make bench`` schedule (25 + 300 steps) on the built-in clouds and
#: of 25 + 1,000 steps on the held-out vase
PLAN = {
    "ellipsoid": [
        *[("small", 25, 300, s) for s in (0, 1, 2)],
        *[("small", 25, f, 0) for f in (100, 1000)],
        *[("small", p, 300, 0) for p in (0, 300)],
        ("medium", 25, 300, 0),
        ("paper", 25, 100, 0),
        *[("small", 25, 300, 0, v) for v in VARIANTS if v],
    ],
    "vase": [
        *[("small", 25, 1000, s) for s in (0, 1, 2)],
        ("small", 25, 300, 0),
        ("medium", 25, 300, 0),
        ("small", 25, 1000, 0, "before issue 25"),
        ("small", 25, 3000, 0),
    ],
}
BATCH = 4


# -- data ----------------------------------------------------------------------------------------
def _read_pcd(path: Path) -> np.ndarray:
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("DATA")) + 1
    return np.loadtxt(lines[start:], dtype=np.float32).reshape(-1, 3)


def builtin_clouds() -> tuple[list[np.ndarray], list[tuple[str, np.ndarray, np.ndarray]]]:
    """The built-in ``builtin_points`` clouds, generated as ``make bench`` generates them."""
    from bench.datasets.builtin import BUILTIN_POINT_DEFECTS
    from bench.datasets.synthetic_real3d import generate

    with tempfile.TemporaryDirectory() as tmp:
        root = generate(tmp, defects=BUILTIN_POINT_DEFECTS) / "ellipsoid"
        train = [_read_pcd(p) for p in sorted((root / "train").glob("*.pcd"))]
        test = []
        for path in sorted((root / "test").glob("*.pcd"), key=lambda p: int(p.stem.split("_")[0])):
            words = path.stem.split("_")
            kind = words[1]
            if kind == "good":
                points = _read_pcd(path)
                test.append(("good", points, np.zeros(len(points), bool)))
            else:
                table = np.loadtxt(root / "gt" / f"{path.stem}.txt", dtype=np.float64)
                test.append((kind, table[:, :3].astype(np.float32), table[:, 3] > 0))
    return train, test


def _data(name: str) -> tuple[list[np.ndarray], list[tuple[str, np.ndarray, np.ndarray]]]:
    if name == "ellipsoid":
        return builtin_clouds()
    from bench.perf.casl_shapes import dataset

    return dataset()


# -- one run -------------------------------------------------------------------------------------
def _batches(clouds: list[np.ndarray]) -> list:
    from bench.types import Batch

    return [
        Batch(
            label=torch.zeros(len(chunk), dtype=torch.long),
            points=[torch.from_numpy(np.ascontiguousarray(c)) for c in chunk],
        )
        for chunk in (clouds[i : i + BATCH] for i in range(0, len(clouds), BATCH))
    ]


def evaluate(detector, test) -> dict[str, float]:
    """Object and point AUROC over all test clouds and per defect type (its clouds and the
    good ones), as the harness's point-cloud evaluation defines them."""
    objects, points = [], []
    for i in range(0, len(test), BATCH):
        chunk = test[i : i + BATCH]
        prediction = detector.predict(_batches([p for _, p, _ in chunk])[0])
        objects += prediction.score.tolist()
        points += [s.cpu().numpy() for s in prediction.point_scores]
    kinds = [k for k, _, _ in test]
    labels = np.array([k != "good" for k in kinds])
    masks = [m for _, _, m in test]
    out = {
        "object": roc_auc_score(labels, objects),
        "point": roc_auc_score(np.concatenate(masks), np.concatenate(points)),
    }
    for kind in sorted(set(kinds) - {"good"}):
        rows = [i for i, k in enumerate(kinds) if k in ("good", kind)]
        out[f"object/{kind}"] = roc_auc_score(labels[rows], np.asarray(objects)[rows])
        out[f"point/{kind}"] = roc_auc_score(
            np.concatenate([masks[i] for i in rows]), np.concatenate([points[i] for i in rows])
        )
    return out


def run_one(job: dict) -> dict:
    """Trains (or fits ``curvature``) and evaluates one point of the curve."""
    torch.set_num_threads(1)
    from bench.adapters.casl import CASL
    from bench.adapters.curvature import Curvature
    from bench.system import seed_everything

    seed_everything(job["seed"])
    train, test = _data(job["dataset"])
    if job["detector"] == "curvature":
        detector = Curvature()
    else:
        detector = CASL(
            **WIDTHS[job["width"]],
            **COMMON,
            pretrain_iterations=job["pretrain"],
            finetune_iterations=job["finetune"],
            **VARIANTS[job.get("variant", "")],
        )
    tic = time.perf_counter()
    detector.fit(_batches(train))
    fit = time.perf_counter() - tic
    tic = time.perf_counter()
    metrics = evaluate(detector, test)
    extra = {"voxel_size": getattr(detector, "voxel_size_", None)}
    return {**job, **metrics, **extra, "fit_s": fit, "test_s": time.perf_counter() - tic}


def jobs() -> list[dict]:
    """Every run, the datasets' plans interleaved so that each dataset's first runs come first."""
    out = [
        dict(dataset=d, detector="curvature", width="", pretrain=0, finetune=0, seed=0)
        for d in PLAN
    ]
    for i in range(max(len(p) for p in PLAN.values())):
        for dataset, plan in PLAN.items():
            if i < len(plan):
                width, pretrain, finetune, seed, *variant = plan[i]
                job = dict(dataset=dataset, detector="casl", width=width, pretrain=pretrain,
                           finetune=finetune, seed=seed)  # fmt: skip
                if variant:
                    job["variant"] = variant[0]
                out.append(job)
    return out


def _key(job: dict) -> str:
    keys = ("dataset", "detector", "width", "pretrain", "finetune", "seed")
    key = "/".join(str(job[k]) for k in keys)
    return f"{key}/{job['variant']}" if job.get("variant") else key


# -- report --------------------------------------------------------------------------------------
def _row(r: dict, kinds: list[str]) -> str:
    name = "curvature" if r["detector"] == "curvature" else f"casl {r['width']}"
    if r.get("variant"):
        name += f", {r['variant']}"
    steps = "–" if r["detector"] == "curvature" else f"{r['pretrain']} + {r['finetune']}"
    cells = [f"{r['object']:.3f}", f"{r['point']:.3f}", *[f"{r[f'point/{k}']:.3f}" for k in kinds]]
    return f"| {name} | {steps} | {r['seed']} | " + " | ".join(cells) + f" | {r['fit_s']:.0f} |"


def markdown(results: list[dict]) -> str:
    lines = ["# CASL learning curve (CPU)", ""]
    for dataset in PLAN:
        rows = [r for r in results if r["dataset"] == dataset]
        if not rows:
            continue
        kinds = sorted(k.split("/")[1] for k in rows[0] if k.startswith("point/"))
        lines += [
            f"## {dataset}",
            "",
            "| detector | steps (pretrain + fine-tune) | seed | object AUROC | point AUROC | "
            + " | ".join(f"point AUROC {k}" for k in kinds)
            + " | fit seconds |",
            "|---" * (5 + len(kinds)) + "|---|",
        ]
        order = {"curvature": 0, "small": 1, "medium": 2, "paper": 3}
        rows.sort(key=lambda r: (order[r["width"] or "curvature"], r.get("variant", ""),
                                 r["pretrain"], r["finetune"], r["seed"]))  # fmt: skip
        lines += [_row(r, kinds) for r in rows]
        lines += ["", *_seed_summary(rows, kinds), ""]
    return "\n".join(lines)


def _seed_summary(rows: list[dict], kinds: list[str]) -> list[str]:
    """Mean [min, max] over the seeds of every setting run with more than one."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["detector"] == "casl":
            key = (r["width"], r["pretrain"], r["finetune"], r.get("variant", ""))
            groups.setdefault(key, []).append(r)
    out = []
    for (width, pretrain, finetune, variant), runs in groups.items():
        if len(runs) < 2:
            continue
        cells = []
        for metric in ("object", "point", *[f"point/{k}" for k in kinds]):
            values = [r[metric] for r in runs]
            cells.append(f"{metric} {np.mean(values):.3f} [{min(values):.3f}, {max(values):.3f}]")
        name = f"casl {width}{', ' + variant if variant else ''}, {pretrain} + {finetune} steps"
        out.append(f"- {name}, {len(runs)} seeds, mean [min, max]: " + "; ".join(cells))
    return out


def main(output: str | Path, quick: bool = False, workers: int = 2) -> None:
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    log = output / "casl_curve.jsonl"
    done = {}
    if log.exists():
        for line in log.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[_key(r)] = r
    todo = [j for j in jobs() if _key(j) not in done]
    if quick:
        todo = [j for j in todo if j["detector"] == "curvature" or j["finetune"] <= 100][:3]
    print(f"casl curve: {len(done)} runs done, {len(todo)} to go ({os.cpu_count()} cores)")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool, log.open("a") as out:
        for r in pool.imap_unordered(run_one, todo):
            out.write(json.dumps(r) + "\n")
            out.flush()
            done[_key(r)] = r
            print(f"  {_key(r)}: object {r['object']:.3f} point {r['point']:.3f} "
                  f"({r['fit_s']:.0f} s)")  # fmt: skip
    results = list(done.values())
    save(output, "casl_curve", {"runs": results}, markdown(results))
