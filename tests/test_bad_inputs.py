"""Bad inputs and late failures, walked in the order of the reliability review (issue 11).

Each test reproduces one failure a user met (silently wrong or lost results, stuck states,
crashes without a useful message) and checks what the user now gets. Items 6 and 8 are
checked here end to end and in full elsewhere: `bench evaluate`'s input checks and the cropped
export in test_rescore.py, truncated job files in `bench sync` and MLflow parent runs (empty
sync parents, parents left RUNNING by a killed run) in test_tracking_robustness.py.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench import Detector, Prediction, register_detector
from bench.benchmark import run_benchmark
from bench.capabilities import TypeDiscovery
from bench.cli import main
from bench.config import BenchConfig, ConfigError, DatasetEntry, DetectorEntry
from bench.datasets import synthetic_ad
from bench.job.fitting import FITTED_STATE
from bench.plan import plan_jobs
from bench.registry import _REGISTRY

REPO = Path(__file__).resolve().parents[1]
FAST = {"weights": "random"}


@pytest.fixture
def weave(tmp_path, ad_root) -> Path:
    """A private copy of one generated category (tests change its files)."""
    root = tmp_path / "data"
    shutil.copytree(ad_root / "weave", root / "weave")
    return root


def _cfg(tmp_path, root, detector="feature_stats", params=FAST, **kw) -> BenchConfig:
    entry = DatasetEntry("mvtec_ad", root=str(root), categories=["weave"], image_size=64)
    settings = {"batch_size": 4, "num_workers": 0, "output": str(tmp_path / "out"), **kw}
    return BenchConfig(
        name="bad",
        detectors=[DetectorEntry(detector, params=dict(params))],
        datasets=[entry],
        **settings,
    )


def _squash(text: str) -> str:
    """Console text without whitespace: rich wraps long lines at the terminal width."""
    return "".join(text.split())


def _state_files(tmp_path) -> list[Path]:
    return sorted((tmp_path / "out" / "bad" / "state").glob(f"*/{FITTED_STATE}"))


# -- 1. stale fitted state after the training data change -------------------------------------
@pytest.mark.slow
def test_changed_training_data_refits_instead_of_reusing_the_old_fit(tmp_path, weave):
    cfg = _cfg(tmp_path, weave)
    (first,), _ = run_benchmark(cfg, track=False)
    train = sorted((weave / "weave" / "train" / "good").glob("*.png"))
    for path in train[: len(train) // 2]:  # half the training set replaced, same names
        noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
        Image.fromarray(noise).save(path)
    (second,), _ = run_benchmark(cfg, track=False)
    assert not second["fit_cached"], "the old fit was reused for new training data"
    assert second["train_fingerprint"] != first["train_fingerprint"]
    assert second["metrics"]["all"] != first["metrics"]["all"]
    # the result equals a run from scratch on the new data
    fresh = _cfg(tmp_path / "fresh", weave)
    (scratch,), _ = run_benchmark(fresh, track=False)
    assert second["metrics"] == scratch["metrics"]


@pytest.mark.slow
def test_changed_test_data_rescores_and_force_refits(tmp_path, weave):
    cfg = _cfg(tmp_path, weave)
    (first,), _ = run_benchmark(cfg, track=False)
    victim = sorted((weave / "weave" / "test" / "good").glob("*.png"))[0]
    victim.unlink()
    (second,), _ = run_benchmark(cfg, track=False)
    assert second["n_test"] == first["n_test"] - 1 and second["fit_cached"]
    (forced,), _ = run_benchmark(cfg, force=True, track=False)
    assert not forced["fit_cached"], "--force reloaded the old fitted state"
    assert forced["metrics"] == second["metrics"]


# -- 2. a category folder that cannot be loaded ------------------------------------------------
def test_a_category_without_train_good_is_an_error_naming_the_folder(tmp_path, ad_root):
    root = tmp_path / "data"
    shutil.copytree(ad_root, root)
    shutil.rmtree(root / "weave" / "train" / "good")
    cfg = _cfg(tmp_path, root)
    cfg.datasets[0].categories = None  # discovered automatically
    with pytest.raises(FileNotFoundError, match=r"weave.*has no train/good folder"):
        plan_jobs(cfg)
    cfg.datasets[0].categories = ["weave"]  # named explicitly: the same clear error
    with pytest.raises(FileNotFoundError, match=r"weave.*has no train/good folder"):
        plan_jobs(cfg)
    others = sorted(set(synthetic_ad.CATEGORIES) - {"weave"})
    cfg.datasets[0].categories = others  # the loadable ones still run
    assert sorted({j.category for j in plan_jobs(cfg)}) == others


# -- 3. the job seed reaches the detector's own random choices ---------------------------------
@pytest.mark.slow
def test_job_seed_reaches_knn_unless_pinned(tmp_path, weave):
    params = {"backbone": "efficientnet_lite0", "coreset_ratio": 0.05, "discover_types": False}
    cfg = _cfg(tmp_path, weave, "knn", params, seeds=[0, 3])
    records, _ = run_benchmark(cfg, track=False)
    assert [r["params"]["seed"] for r in records] == [0, 3]
    banks = [torch.load(p, weights_only=False)["state"]["bank_"] for p in _state_files(tmp_path)]
    assert len(banks) == 2 and not torch.equal(banks[0], banks[1])
    pinned = _cfg(tmp_path / "pinned", weave, "knn", {**params, "seed": 7}, seeds=[0, 3])
    assert {j.params["seed"] for j in plan_jobs(pinned)} == {7}


@pytest.mark.slow
def test_job_seed_reaches_a_trained_detector(tmp_path, weave):
    """The autoencoder has no seed parameter: its initialisation and batch order follow the
    job seed through the runner's seeding, so two seeds train two different models."""
    params = {"iterations": 3, "width": 4, "latent": 8, "checkpoint_every": 3}
    cfg = _cfg(tmp_path, weave, "autoencoder", params, seeds=[0, 1])
    records, _ = run_benchmark(cfg, track=False)
    states = [torch.load(p, weights_only=False)["state"] for p in _state_files(tmp_path)]
    weights = [next(iter(s["model_"].state_dict().values())) for s in states]
    assert len(weights) == 2 and not torch.equal(weights[0], weights[1])
    assert records[0]["metrics"] != records[1]["metrics"]


# -- 4. curves past 2^24 thresholds ------------------------------------------------------------
@pytest.mark.slow
def test_curves_with_more_than_2_24_distinct_scores():
    from bench.metrics import point_metrics

    n = (1 << 24) + 3  # float32 rounds n - 1 up to n: the old linspace indexed past the end
    scores = torch.arange(n, dtype=torch.float64)
    labels = scores >= n - 1000  # the 1000 highest points are defective: AUROC 1
    curves: dict = {}
    out = point_metrics([scores], [labels], curves)
    assert out["point_auroc"] == 1.0 and out["point_ap"] == pytest.approx(1.0)
    assert curves["fpr"][0] == 0.0 and curves["fpr"][-1] == 1.0 and len(curves["fpr"]) == 512


def test_evenly_spaced_indices_are_exact_at_any_size():
    from bench.metrics import evenly_spaced

    for n in (1, 2, 7, 513, (1 << 24) + 3, 29076652):
        idx = evenly_spaced(n, 512)
        expected = sorted(
            {round(i * (n - 1) / max(1, min(512, n) - 1)) for i in range(min(512, n))}
        )
        assert idx.tolist() == expected and int(idx[-1]) == n - 1


# -- 5. work thrown away on a late failure -----------------------------------------------------
def test_an_unwritable_output_fails_before_fitting(tmp_path, weave):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the results folder should be")
    cfg = _cfg(tmp_path, weave, output=str(blocker / "results"))
    with pytest.raises(ConfigError, match="cannot write to .*not-a-folder"):
        run_benchmark(cfg, track=False)
    cfg = _cfg(tmp_path, weave, export_maps=str(blocker / "maps"))
    with pytest.raises(ConfigError, match="cannot write to .*maps"):
        run_benchmark(cfg, track=False)
    assert not (tmp_path / "out" / "bad" / "jobs").exists() or not any(
        (tmp_path / "out" / "bad" / "jobs").iterdir()
    )


@pytest.fixture
def late_failure(tmp_path):
    """A detector whose anomaly-type discovery (after prediction) fails while a marker exists;
    it counts its predict calls in a file."""
    marker, calls = tmp_path / "break", tmp_path / "calls"
    marker.touch()

    @register_detector("late_failure_test")
    class LateFailure(Detector, TypeDiscovery):
        """Brightness as the anomaly score; discovery breaks while the marker exists."""

        def fit(self, train):
            self.mean_ = torch.stack([b.image.mean((0, 2, 3)) for b in train]).mean(0)

        def predict(self, batch):
            with calls.open("a") as f:
                f.write(f"{len(batch)}\n")
            maps = (batch.image - self.mean_[:, None, None]).abs().mean(1)
            return Prediction(score=maps.flatten(1).amax(1), anomaly_map=maps)

        def describe_regions(self, images, masks):
            if marker.exists():
                raise RuntimeError("simulated failure after prediction")
            return images.mean((2, 3))

    yield marker, calls
    _REGISTRY.pop("late_failure_test", None)


@pytest.mark.slow
def test_predictions_survive_a_failure_after_prediction(tmp_path, weave, late_failure):
    marker, calls = late_failure
    cfg = _cfg(tmp_path, weave, "late_failure_test", {})
    records, failed = run_benchmark(cfg, track=False)
    assert failed == ["late_failure_test/mvtec_ad/weave/seed0"] and not records
    kept = list((tmp_path / "out" / "bad" / "state").glob("*/predictions-*.pt"))
    assert len(kept) == 1
    predicted = calls.read_text()
    marker.unlink()
    (record,), failed = run_benchmark(cfg, track=False)
    assert not failed and record["predictions_resumed"] and record["fit_cached"]
    assert calls.read_text() == predicted, "the test set was predicted again"
    assert not kept[0].exists(), "kept predictions are removed once the job is saved"
    fresh = _cfg(tmp_path / "fresh", weave, "late_failure_test", {})
    (scratch,), _ = run_benchmark(fresh, track=False)
    assert record["metrics"] == scratch["metrics"]


# -- 6. bench evaluate on wrong input (in full: test_rescore.py) --------------------------------
@pytest.mark.slow
def test_evaluate_names_a_stretched_map_and_a_duplicated_score_row(tmp_path, weave, capsys):
    import tifffile

    cfg = _cfg(tmp_path, weave, export_maps=str(tmp_path / "maps"))
    run_benchmark(cfg, track=False)
    maps = tmp_path / "maps" / "feature_stats" / "mvtec_ad" / "seed0"
    scores = maps / "weave" / "scores.csv"
    rows = scores.read_text().splitlines()
    (tmp_path / "dup.csv").write_text("\n".join([*rows, rows[1]]) + "\n")
    ev = ["evaluate", "--maps", str(maps), "--data", str(weave)]
    assert main([*ev, "--scores", str(tmp_path / "dup.csv")]) == 2
    assert _squash(f"line {len(rows) + 1}: row (") in _squash(capsys.readouterr().err)
    victim = sorted(maps.glob("weave/test/good/*.tiff"))[0]
    tifffile.imwrite(victim, tifffile.imread(victim)[:, :64])  # half the width
    assert main(ev) == 2
    assert _squash(f"anomaly map {victim} is 128x64") in _squash(capsys.readouterr().err)


# -- 7. a truncated fitted state ----------------------------------------------------------------
@pytest.mark.slow
def test_a_truncated_fitted_state_is_named_and_refitted(tmp_path, weave, capsys):
    """Fitted state is a cache: a truncated file is named and the job fits again (with or
    without --force), with the numbers of the first fit."""
    cfg = _cfg(tmp_path, weave)
    (first,), _ = run_benchmark(cfg, track=False)
    (state,) = _state_files(tmp_path)
    state.write_bytes(state.read_bytes()[:100])
    records, failed = run_benchmark(cfg, force=True, track=False)
    assert not failed and not records[0]["fit_cached"]
    assert records[0]["metrics"] == first["metrics"]
    state.write_bytes(state.read_bytes()[:100])
    (tmp_path / "out" / "bad" / "jobs" / f"{first['run_name'].replace('/', '__')}.json").unlink()
    capsys.readouterr()
    records, failed = run_benchmark(cfg, track=False)
    assert not failed and not records[0]["fit_cached"]
    assert records[0]["metrics"] == first["metrics"]
    err = _squash(capsys.readouterr().err)
    assert _squash(f"fitted state {state} is unreadable") in err and "fittingagain" in err


@pytest.mark.slow
def test_a_truncated_checkpoint_is_named_and_training_starts_afresh(tmp_path, weave, capsys):
    params = {"iterations": 4, "width": 4, "latent": 8, "checkpoint_every": 2}
    cfg = _cfg(tmp_path, weave, "autoencoder", params)
    (first,), _ = run_benchmark(cfg, track=False)
    (state,) = _state_files(tmp_path)
    checkpoint = state.parent / "last.ckpt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    state.unlink()  # as if killed during training, after a checkpoint
    (tmp_path / "out" / "bad" / "jobs" / f"{first['run_name'].replace('/', '__')}.json").unlink()
    capsys.readouterr()
    (again,), failed = run_benchmark(cfg, track=False)
    assert not failed and again["metrics"] == first["metrics"]
    err = _squash(capsys.readouterr().err)
    assert _squash(f"training checkpoint {checkpoint} is unreadable") in err


# -- 8. a truncated job file (MLflow sync and parent runs: test_tracking_robustness.py) --------
@pytest.mark.slow
def test_report_names_and_skips_a_truncated_job_file(tmp_path, weave, capsys):
    cfg = _cfg(tmp_path, weave, seeds=[0, 1])
    records, _ = run_benchmark(cfg, track=False)
    job = tmp_path / "out" / "bad" / "jobs" / f"{records[1]['run_name'].replace('/', '__')}.json"
    job.write_text(job.read_text()[:300])
    capsys.readouterr()
    assert main(["report", "--name", "bad", "--output", str(tmp_path / "out")]) == 0
    err = _squash(capsys.readouterr().err)
    assert _squash(f"skipping unreadable result file {job}") in err
    rerun, _ = run_benchmark(cfg, track=False)  # the truncated job counts as not finished
    assert rerun[1]["metrics"] == records[1]["metrics"] and job.read_text().endswith("}")


# -- 9. parameters validated before any job ----------------------------------------------------
@pytest.mark.parametrize(
    ("detector", "params", "expected"),
    [
        ("knn", {"coreset_ratio": "abc"}, r"coreset_ratio = 'abc'.*a number > 0 and <= 1"),
        ("feature_stats", {"sigma": "abc"}, r"sigma = 'abc'.*a number >= 0"),
        ("feature_stats", {"sigma": -4}, r"sigma = -4.*a number >= 0"),
        ("feature_stats", {"score": "mean"}, r"score = 'mean'.*one of 'max', 'topk'"),
        ("knn", {"layers": [2, "x"]}, r"layers = \[2, 'x'\].*list of integers"),
        ("autoencoder", {"iterations": 0}, r"iterations = 0.*integer >= 1"),
        ("curvature", {"ks": [16, 2.5]}, r"ks = \[16, 2.5\]"),
    ],
)
def test_bad_parameters_fail_at_plan_time(tmp_path, ad_root, detector, params, expected):
    cfg = _cfg(tmp_path, ad_root, detector, params)
    if detector == "curvature":
        cfg.datasets = [DatasetEntry("builtin_points")]
    with pytest.raises(ValueError, match=rf"detector '{detector}': parameter {expected}"):
        plan_jobs(cfg)


def test_good_parameters_pass_and_the_cli_names_bad_ones(tmp_path, ad_root, capsys):
    params = {"sigma": 0, "layers": [1, 2], "score": "topk", "variance_floor": 1}
    assert plan_jobs(_cfg(tmp_path, ad_root, "feature_stats", {**FAST, **params}))
    args = ["run", "--detectors", "feature_stats", "--datasets", "builtin_ad", "--no-tracking"]
    out = str(tmp_path / "cli")
    assert main([*args, "--output", out, "--param", "feature_stats.sigma=abc"]) == 2
    assert "parameter sigma = 'abc' is not valid; expected a number >= 0" in capsys.readouterr().err
    assert main([*args, "--output", out, "--image-size", "abc"]) == 2
    assert "image_size must be a positive integer" in capsys.readouterr().err
    assert not Path(out).exists(), "nothing ran"


# -- 10. clear messages instead of raw tracebacks ----------------------------------------------
def test_device_errors_are_one_line(tmp_path, capsys):
    args = ["run", "--datasets", "builtin_ad", "--no-tracking", "--output", str(tmp_path)]
    assert main([*args, "--device", "gpu"]) == 2
    assert "device must be auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*args, "--device", "cuda"]) == 2
        assert "sees no CUDA GPU; use --device cpu" in capsys.readouterr().err


def test_seeds_that_are_not_integers(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--seeds", "a,b"])
    err = capsys.readouterr().err
    assert "expected comma-separated integers such as 0,1,2, got 'a,b'" in err
    assert "lambda" not in err


@pytest.mark.slow
def test_an_unreadable_image_in_a_worker_is_one_line(tmp_path, weave, capsys):
    broken = sorted((weave / "weave" / "test" / "good").glob("*.png"))[0]
    broken.write_bytes(b"not a png")
    cfg = _cfg(tmp_path, weave, num_workers=1)
    records, failed = run_benchmark(cfg, track=False)
    out = capsys.readouterr().err
    assert failed and _squash(f"DataError: cannot read image {broken}") in _squash(out)
    assert (
        "Original Traceback" not in out
        and "Traceback" in next((tmp_path / "out" / "bad" / "failed").glob("*.txt")).read_text()
    )


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume(tmp_path, weave):
    """A real `bench run` process interrupted with SIGINT (what Ctrl-C sends)."""
    cmd = [sys.executable, "-m", "bench", "run", "--detectors", "autoencoder", "--datasets",
           "mvtec_ad", "--root", f"mvtec_ad={weave}", "--categories", "weave", "--image-size",
           "64", "--param", "autoencoder.iterations=100000", "--no-tracking", "--device", "cpu",
           "--num-workers", "0", "--output", str(tmp_path / "out")]  # fmt: skip
    env = {**os.environ, "ADBENCH_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}
    # a suite started in the background (`make test &`) hands its children SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler: restore the default, as a terminal has
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "out" / "default" / "state").is_dir():
        time.sleep(0.2)  # planning is done, the job starts
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert b"interrupted; re-run the same command to resume" in err
    assert b"Traceback" not in err


# -- smaller ones ------------------------------------------------------------------------------
@pytest.mark.slow
def test_orphan_masks_are_reported_in_the_record(tmp_path, weave):
    image = sorted((weave / "weave" / "test").glob("[!g]*/*.png"))[0]
    image.unlink()
    (record,), _ = run_benchmark(_cfg(tmp_path, weave), track=False)
    mask = weave / "weave" / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"
    assert any(f"1 ground-truth mask(s) have no test image, e.g. {mask}" in w
               for w in record["warnings"])  # fmt: skip


@pytest.mark.slow
def test_mixed_image_sizes_name_the_odd_file(tmp_path, weave):
    odd = sorted((weave / "weave" / "test" / "good").glob("*.png"))[1]
    Image.open(odd).resize((96, 128)).save(odd)
    cfg = _cfg(tmp_path, weave)
    cfg.datasets[0].image_size = "native"
    records, failed = run_benchmark(cfg, track=False)
    text = next((tmp_path / "out" / "bad" / "failed").glob("*.txt")).read_text()
    assert failed and f"but {odd} (128x96)" in text and "most are 128x128" in text


# -- issue 29, item 5: absurd values of every flag, one line before any job -------------------
GPUS = "expected 0, a fraction from 0.0001 to 1 (jobs share a GPU) or a whole number of GPUs"
ADDRESS = "expected a Ray address: auto, HOST:PORT or ray://HOST:PORT (port 1 to 65535)"
RESAMPLES = "expected 0 (no intervals) or from 50 to 100000 resamples"
FLAG_ROWS = [
    (["--gpus-per-job", "inf"], f"bench: error: --gpus-per-job inf is not valid; {GPUS} up to 16"),
    (["--gpus-per-job", "nan"], f"--gpus-per-job nan is not valid; {GPUS}"),
    (["--gpus-per-job=-inf"], f"--gpus-per-job -inf is not valid; {GPUS}"),
    (
        ["--gpus-per-job", "-inf"],
        "argument --gpus-per-job: expected one argument (a value "
        "starting with '-' is written --FLAG=VALUE)",
    ),
    (["--gpus-per-job", "1e30"], f"--gpus-per-job 1e+30 is not valid; {GPUS}"),
    (["--gpus-per-job", "17"], f"--gpus-per-job 17 is not valid; {GPUS}"),
    (["--gpus-per-job", "1.5"], f"--gpus-per-job 1.5 is not valid; {GPUS}"),
    (["--gpus-per-job", "0.00001"], f"--gpus-per-job 1e-05 is not valid; {GPUS}"),
    (["--gpus-per-job", "-1"], f"--gpus-per-job -1 is not valid; {GPUS}"),
    (["--gpus-per-job", "abc"], "argument --gpus-per-job: expected a number, got 'abc'"),
    (["--gpus-per-job", ""], "argument --gpus-per-job: expected a number, got ''"),
    (["--cpus-per-job", "inf"], "--cpus-per-job inf is not valid; expected a number of CPUs"),
    (["--cpus-per-job", "nan"], "--cpus-per-job nan is not valid; expected a number of CPUs"),
    (["--cpus-per-job", "1e30"], "--cpus-per-job 1e+30 is not valid; expected a number of CPUs"),
    (["--cpus-per-job", "-1"], "--cpus-per-job -1 is not valid; expected a number of CPUs"),
    (["--cpus-per-job", "0"], "--cpus-per-job 0 is not valid without GPUs per job"),
    (["--max-retries", "-1"], "--max-retries -1 is not valid; expected an integer from 0 to 100"),
    (["--max-retries", "1000000000"], "--max-retries 1000000000 is not valid; expected an integer"),
    (["--max-retries", str(10**20)], f"--max-retries {10**20} is not valid; expected an integer"),
    (["--max-retries", "inf"], "argument --max-retries: expected an integer, got 'inf'"),
    (["--max-retries", "1.5"], "argument --max-retries: expected an integer, got '1.5'"),
    (
        ["--scope", "nonsense"],
        "argument --scope: 'nonsense' is not valid; expected one of per_category, unified",
    ),
    (["--scope", "unifed"], "expected one of per_category, unified (did you mean 'unified'?)"),
    (
        ["--executor", "nonsense"],
        "argument --executor: 'nonsense' is not valid; expected one of local, ray",
    ),
    (["--executor", "rya"], "'rya' is not valid; expected one of local, ray (did you mean 'ray'?)"),
    (["--executor", ""], "argument --executor: '' is not valid; expected one of local, ray"),
    (["--protocol", "fats"], "expected one of official, fast (did you mean 'fast'?)"),
    (["--train-on", ""], "--train-on '' is not valid; expected DATASET[:CATEGORY,...]"),
    (["--train-on", ":pcb1"], "--train-on ':pcb1' is not valid; expected DATASET[:CATEGORY,...]"),
    (
        ["--train-on", "mvtc_ad"],
        "--train-on 'mvtc_ad' is not valid: unknown dataset 'mvtc_ad' (did you mean 'mvtec_ad'?)",
    ),
    (["--shots", "0"], "--shots 0 is not valid; expected an integer >= 1"),
    (["--shots", "-1"], "--shots -1 is not valid; expected an integer >= 1"),
    (["--shots", "1.5"], "argument --shots: expected an integer, got '1.5'"),
    (["--shots", "inf"], "argument --shots: expected an integer, got 'inf'"),
    (["--shot-draws", "0"], "--shot-draws 0 is not valid; expected an integer from 1 to 1000"),
    (["--shots", "2", "--shot-draws", "1000000000"], "--shot-draws 1000000000 is not valid"),
    (["--shot-file", ""], "--shot-file '' is not valid; expected one or more file paths"),
    (["--address", ""], f"--address '' is not valid; {ADDRESS}"),
    (["--address", "host:notaport"], f"--address 'host:notaport' is not valid; {ADDRESS}"),
    (["--address", "host:99999"], f"--address 'host:99999' is not valid; {ADDRESS}"),
    (["--executor", "ray", "--address", ":6379"], f"--address ':6379' is not valid; {ADDRESS}"),
    (["--bootstrap", "10"], f"--bootstrap 10 is not valid; {RESAMPLES}"),
    (["--bootstrap", "-1"], f"--bootstrap -1 is not valid; {RESAMPLES}"),
    (["--bootstrap", str(10**20)], f"--bootstrap {10**20} is not valid; {RESAMPLES}"),
    (["--bootstrap", "inf"], "argument --bootstrap: expected an integer, got 'inf'"),
    (["--bootstrap-seed", "-1"], "--bootstrap-seed -1 is not valid; expected an integer from 0"),
    (["--bootstrap-seed", str(10**20)], f"--bootstrap-seed {10**20} is not valid"),
    (["--batch-size", str(10**20)], f"--batch-size {10**20} is not valid; expected an integer"),
    (["--num-workers", str(10**20)], f"--num-workers {10**20} is not valid; expected an integer"),
    (["--seeds", "0,-1"], "--seeds 0,-1 is not valid; expected one or more integer seeds"),
    (["--seeds", str(10**20)], f"--seeds {10**20} is not valid; expected one or more integer"),
    (["--train-log-every", "0"], "--train-log-every 0 is not valid; expected an integer >= 1"),
    (["--name", ""], "--name '' is not valid; expected a non-empty name"),
]


@pytest.mark.parametrize(("flags", "expected"), FLAG_ROWS, ids=[" ".join(r[0]) for r in FLAG_ROWS])
def test_absurd_flag_values_are_one_line_before_any_job(tmp_path, capsys, flags, expected):
    """No data is read: each value is refused as the command line is read."""
    out = tmp_path / "out"
    args = ["run", "--detectors", "feature_stats", "--datasets", "builtin_ad", "--no-tracking",
            "--output", str(out), *flags]  # fmt: skip
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse: a value of the wrong type or an unknown choice
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists(), "nothing ran"


TOML_ROWS = [
    ("gpus_per_job = inf", f"gpus_per_job = inf is not valid; {GPUS}"),
    ("gpus_per_job = -inf", f"gpus_per_job = -inf is not valid; {GPUS}"),
    ("cpus_per_job = nan", "cpus_per_job = nan is not valid; expected a number of CPUs"),
    ("max_retries = 1_000_000_000", "max_retries = 1000000000 is not valid; expected an integer"),
    ("max_retries = 1.5", "max_retries = 1.5 is not valid; expected an integer from 0 to 100"),
    ('executor = "rya"', 'executor = "rya" is not valid; expected one of local, ray (did you'),
    ('scope = "nonsense"', 'scope = "nonsense" is not valid; expected one of per_category'),
    ('train_on = ""', 'train_on = "" is not valid; expected DATASET[:CATEGORY,...]'),
    (
        "train_on = { root = '/data' }",
        "train_on = {'root': '/data'} is not valid; expected a table",
    ),
    ("shots = 0", "shots = 0 is not valid; expected an integer >= 1"),
    ("shot_draws = 0", "shot_draws = 0 is not valid; expected an integer from 1 to 1000"),
    ('shot_files = ""', 'shot_files = "" is not valid; expected one or more file paths'),
    ('ray_address = "host:99999"', f'ray_address = "host:99999" is not valid; {ADDRESS}'),
    ("bootstrap = 10", f"bootstrap = 10 is not valid; {RESAMPLES}"),
    ("bootstrap_seed = -1", "bootstrap_seed = -1 is not valid; expected an integer from 0"),
]


@pytest.mark.parametrize(("line", "expected"), TOML_ROWS, ids=[r[0] for r in TOML_ROWS])
def test_absurd_config_values_name_the_file_and_key(tmp_path, capsys, line, expected):
    config = tmp_path / "c.toml"
    config.write_text(
        f'{line}\n[[detectors]]\nname = "feature_stats"\n[[datasets]]\nname = "builtin_ad"\n'
    )
    out = tmp_path / "out"
    assert main(["run", "--config", str(config), "--no-tracking", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"bench: error: {config}: {expected}" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_shot_lists_and_shots_are_checked_at_plan_time(tmp_path, ad_root, capsys):
    """What only the data can tell (how many training images a category holds, what a shot
    file lists) fails while planning, before any fit, naming the file or the category."""
    out = tmp_path / "out"
    args = ["run", "--detectors", "feature_stats", "--datasets", "mvtec_ad", "--root",
            str(ad_root), "--categories", "weave", "--no-tracking", "--output", str(out)]  # fmt: skip
    binary = tmp_path / "refs.bin"
    binary.write_bytes(b"\x00\xff\xfe")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    cases = [
        (["--shots", "13"], "mvtec_ad/weave: shots = 13 but its training split holds only 12"),
        (["--shot-file", str(tmp_path / "missing.txt")], "missing.txt: cannot be read (No such"),
        (["--shot-file", str(tmp_path)], f"shot file {tmp_path}: cannot be read (Is a directory)"),
        (["--shot-file", str(binary)], f"shot file {binary}: not a text file; expected one image"),
        (["--shot-file", str(empty)], f"shot file {empty}: lists no image"),
    ]
    for flags, expected in cases:
        assert main([*args, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists(), "nothing ran"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--bootstrap", "10"], f"--bootstrap 10 is not valid; {RESAMPLES}"),
        (["--bootstrap", str(10**20)], f"--bootstrap {10**20} is not valid; {RESAMPLES}"),
        (["--bootstrap", "abc"], "argument --bootstrap: expected an integer, got 'abc'"),
        (["--pro-limit", "nan"], "--pro-limit nan is not valid; expected a false-positive rate"),
        (["--pro-limit", "0"], "--pro-limit 0 is not valid; expected a false-positive rate"),
        (["--protocol", "fats"], "expected one of official, fast (did you mean 'fast'?)"),
    ],
)
def test_evaluate_flags_are_checked_before_any_file(tmp_path, capsys, flags, expected):
    args = ["evaluate", "--maps", str(tmp_path / "maps"), "--data", str(tmp_path), *flags]
    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_a_run_without_intervals_writes_its_report(tmp_path, ad_root, capsys):
    """``--bootstrap 0`` (no intervals) once crashed while writing the leaderboard."""
    out = tmp_path / "out"
    args = ["run", "--detectors", "feature_stats", "--datasets", "mvtec_ad", "--root",
            str(ad_root), "--categories", "weave", "--param", "feature_stats.weights=random",
            "--image-size", "64", "--num-workers", "0", "--device", "cpu", "--no-tracking",
            "--bootstrap", "0", "--output", str(out)]  # fmt: skip
    assert main(args) == 0
    summary = (out / "default" / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("detector,fit,dataset,image_auroc,") and "_ci_" not in summary[0]
    assert summary[1].startswith("feature_stats,per-category,mvtec_ad,")


def test_a_config_built_in_code_is_checked_like_a_file(tmp_path, weave):
    """run_benchmark on a BenchConfig made in Python: the executor never sees an absurd value
    (on Ray, --gpus-per-job inf was an OverflowError)."""
    cfg = _cfg(tmp_path, weave, gpus_per_job=math.inf, executor="ray")
    with pytest.raises(ConfigError, match=r"^BenchConfig: gpus_per_job = inf is not valid"):
        run_benchmark(cfg, track=False)
    assert not (tmp_path / "out").exists()
