"""Bad result files, an output folder that turns read-only, and bad `bench evaluate` inputs
(issue 29, items 3 and 4, and the empty scores file).

Each test reproduces what a user met and checks what the user now gets: a result file that does
not match the record schema is skipped with its path and first problem named (by every reader:
report, HTML report, compare, sync, and `bench run`'s resume, which computes it again); a job
whose files cannot be written fails with the path named while the others go on, and the run ends
non-zero with a summary; a `bench evaluate` input that cannot be read is one line naming it.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import math
import os
import pickle
import select
import shutil
import signal
import stat
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench import Detector, Prediction, register_detector
from bench.benchmark import run_benchmark
from bench.cli import main
from bench.config import BenchConfig, DatasetEntry, DetectorEntry
from bench.registry import _REGISTRY
from bench.results import FULL_RECORD, check_record

NAME = "br"


def bench(*args: str) -> SimpleNamespace:
    """The ``bench`` command in this process: exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(list(args))
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def _squash(text: str) -> str:
    """Console text without whitespace: rich wraps long lines at the terminal width."""
    return "".join(text.split())


def _cfg(output: Path, root: Path, detector: str = "feature_stats", seeds=(0, 1)) -> BenchConfig:
    params = {"weights": "random"} if detector == "feature_stats" else {}
    entry = DatasetEntry("mvtec_ad", root=str(root), categories=["weave"], image_size=64)
    return BenchConfig(
        name=NAME,
        detectors=[DetectorEntry(detector, params=params)],
        datasets=[entry],
        seeds=list(seeds),
        batch_size=8,
        num_workers=0,
        bootstrap=50,
        output=str(output),
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory, ad_root) -> tuple[Path, list[dict]]:
    """A finished benchmark (feature_stats, seeds 0 and 1) to copy: (output folder, records)."""
    output = tmp_path_factory.mktemp("finished")
    records, failed = run_benchmark(_cfg(output, ad_root), track=False)
    assert not failed and len(records) == 2
    return output, records


@pytest.fixture
def out(tmp_path, finished) -> Path:
    """A private copy of the finished benchmark's output folder."""
    shutil.copytree(finished[0], tmp_path / "out")
    return tmp_path / "out"


def job_file(output: Path, record: dict) -> Path:
    return output / NAME / "jobs" / f"{record['run_name'].replace('/', '__')}.json"


def damage(path: Path, change) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def string_metric(record: dict) -> None:
    record["metrics"]["all"]["image_auroc"] = "high"


# -- 3. a result file that does not match the schema -----------------------------------------
#: what the leaderboards need of a record (older and hand-made records hold no more)
LEADERBOARD_RECORD = {
    "detector": "d", "dataset": "ds", "category": "c", "seed": 0, "protocol": "official",
    "metric_version": "1.0", "timings": {"fit_seconds": 1.0, "predict_images_per_second": None},
    "metrics": {"all": {"image_auroc": 0.9, "aupimo": math.nan, "au_pro": None},
                "crack": {"image_auroc": 0.8}},
}  # fmt: skip


def with_field(path: str, value) -> dict:
    """A copy of :data:`LEADERBOARD_RECORD` with ``value`` at the dotted ``path``."""
    record = json.loads(json.dumps(LEADERBOARD_RECORD))
    *parents, last = path.split(".")
    target = record
    for key in parents:
        target = target.setdefault(key, {})
    target[last] = value
    return record


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"run_name": "x"}, "field 'detector' is missing"),
        (with_field("metrics.all.image_auroc", "high"),
         "field 'metrics.all.image_auroc' is 'high', expected a number"),
        (with_field("metrics.all.au_pro", True),
         "field 'metrics.all.au_pro' is True, expected a number"),
        (with_field("metrics.all.au_pro", math.inf),
         "field 'metrics.all.au_pro' is inf, expected a number"),
        (with_field("metrics.crack", []), "field 'metrics.crack' is [], expected an object"),
        (with_field("metrics", {}), "field 'metrics.all' is missing"),
        (with_field("metrics", []), "field 'metrics' is [], expected an object"),
        (with_field("seed", "0"), "field 'seed' is '0', expected an integer"),
        (with_field("timings", None), "field 'timings' is None, expected an object"),
        (with_field("ci.metrics.au_pro", [0.1]),
         "field 'ci.metrics.au_pro' is [0.1], expected [low, high]"),
        (with_field("per_image", 3), "field 'per_image' is 3, expected a string"),
        (with_field("category", list(range(30))),  # a long value: its start
         f"field 'category' is {str(list(range(30)))[:37]}..., expected a string"),
    ],
)  # fmt: skip
def test_the_first_problem_of_a_record_is_named(record, problem):
    assert check_record(LEADERBOARD_RECORD) is None  # NaN (undefined) and null metrics are valid
    assert check_record(record) == problem


def test_tracking_needs_the_whole_record():
    assert check_record(LEADERBOARD_RECORD, FULL_RECORD) == "field 'run_name' is missing"


@pytest.mark.slow
def test_report_and_html_report_skip_bad_records_naming_them(out, finished):
    first, second = finished[1]
    missing = out / NAME / "jobs" / "x.json"
    missing.write_text(json.dumps({"run_name": "x"}))
    damage(job_file(out, second), string_metric)
    result = bench("report", "--name", NAME, "--output", str(out), "--html")
    assert result.returncode == 0, result.stderr
    err = _squash(result.stderr)
    assert _squash(f"skipping result file {missing}: field 'detector' is missing") in err
    assert (
        _squash(
            f"skipping result file {job_file(out, second)}: field 'metrics.all.image_auroc' is "
            "'high', expected a number"
        )
        in err
    )
    leaderboard = (out / NAME / "leaderboard.md").read_text()
    assert f"{first['metrics']['all']['image_auroc']:.4f}" in leaderboard
    assert (out / NAME / "report.html").is_file()


@pytest.mark.slow
def test_compare_skips_a_bad_record_naming_it(out, finished):
    first, second = finished[1]
    other = json.loads(job_file(out, second).read_text())
    other.update(detector="other", run_name=other["run_name"].replace("feature_stats", "other"))
    job_file(out, other).write_text(json.dumps(other))
    damage(job_file(out, first), lambda r: r.pop("category"))
    damage(job_file(out, second), lambda r: r.update(detector="third"))
    result = bench("compare", str(out / NAME), "--metric", "image_auroc")
    assert result.returncode == 0, result.stderr
    err = _squash(result.stderr)
    assert _squash(f"skipping result file {job_file(out, first)}: field 'category'") in err
    table = (out / NAME / "compare-image_auroc.csv").read_text()
    assert "other" in table and "third" in table


@pytest.mark.slow
def test_sync_skips_a_record_tracking_cannot_use(out, finished, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first, second = finished[1]
    damage(job_file(out, second), lambda r: r.pop("device"))
    uri = f"sqlite:///{out / 'mlflow.db'}"
    result = bench("sync", "--name", NAME, "--output", str(out), "--tracking-uri", uri)
    assert result.returncode == 0, result.stderr
    err = _squash(result.stderr)
    assert (
        _squash(f"skipping result file {job_file(out, second)}: field 'device' is missing") in err
    )
    assert "1 job(s) uploaded" in result.stderr


@pytest.mark.slow
def test_run_computes_a_bad_record_again_and_says_so(out, finished, ad_root, capsys):
    first, second = finished[1]
    assert check_record(first, FULL_RECORD) is None  # what `bench run` writes is whole
    damage(job_file(out, second), string_metric)
    capsys.readouterr()
    records, failed = run_benchmark(_cfg(out, ad_root), track=False)
    err = _squash(capsys.readouterr().err)
    assert not failed
    assert (
        _squash(
            f"skipping result file {job_file(out, second)}: field 'metrics.all.image_auroc' is "
            "'high', expected a number; its job counts as not finished"
        )
        in err
    )
    assert _squash(f"{first['run_name']}: done before, skipped") in err
    again = json.loads(job_file(out, second).read_text())

    def same(a: dict) -> str:  # NaN (an undefined metric) equals itself in JSON
        return json.dumps(a["metrics"], sort_keys=True)

    assert same(again) == same(second) == same(records[1])


# -- 4. the output folder made read-only during a run ----------------------------------------
def _permissions_enforced(folder: Path) -> bool:
    """False for root with its usual capabilities, who writes into read-only folders."""
    probe = folder / "probe"
    probe.mkdir()
    probe.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        (probe / "x").touch()
        return False
    except PermissionError:
        return True
    finally:
        probe.chmod(stat.S_IRWXU)
        (probe / "x").unlink(missing_ok=True)
        probe.rmdir()


def _drop_dac_capabilities() -> None:
    """Drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from this process (capset(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # two (effective, permitted, inheritable) structs
    if libc.capget(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    for i in range(3):  # the first struct holds capabilities 0-31; these are 1 and 2
        data[i] &= ~0b110
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def _enforced(function, *args) -> tuple[str, object]:
    """("done", ``function(*args)``), or ("skip", why) where read-only folders are writable."""
    with tempfile.TemporaryDirectory() as probe:
        if not _permissions_enforced(Path(probe)):
            return "skip", "file permissions are not enforced for this user"
    return "done", function(*args)


#: the most a forked child may take before it is killed
CHILD_SECONDS = 300


def _read_until(fd: int, deadline: float) -> bytes:
    """The next bytes from ``fd``; empty at its end or once ``deadline`` passed."""
    ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
    return os.read(fd, 1 << 16) if ready else b""


def _in_child(function, *args) -> tuple[str, object]:
    """``_enforced(function, *args)`` in a forked child without root's file capabilities."""
    read, write = os.pipe()
    if (pid := os.fork()) == 0:  # the child: sends its outcome, never returns into pytest
        code = 1
        try:
            with os.fdopen(write, "wb") as pipe:
                try:
                    torch.set_num_threads(1)  # the parent's OpenMP pool hangs after fork
                    _drop_dac_capabilities()
                except (AttributeError, OSError) as exc:  # no capset(2) here: not Linux
                    outcome = ("skip", f"cannot drop root's file capabilities: {exc}")
                else:
                    try:
                        outcome = _enforced(function, *args)
                    except BaseException:
                        outcome = ("error", traceback.format_exc())
                pickle.dump(outcome, pipe)
            code = int(outcome[0] == "error")
        finally:
            os._exit(code)
    os.close(write)
    chunks, deadline = [], time.monotonic() + CHILD_SECONDS
    with os.fdopen(read, "rb") as pipe:
        while chunk := _read_until(pipe.fileno(), deadline):
            chunks.append(chunk)
    if time.monotonic() >= deadline:  # a hung child fails the test instead of hanging CI
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return "error", f"the child did not finish in {CHILD_SECONDS} s and was killed"
    sent = b"".join(chunks)
    _, status = os.waitpid(pid, 0)
    return pickle.loads(sent) if sent else ("error", f"the child died (status {status})")


def unprivileged(function, *args):
    """``function(*args)`` where file permissions hold. Root (as in CI) writes into read-only
    folders (CAP_DAC_OVERRIDE), so for root it runs in a forked child that drops that first.
    Skipped where permissions cannot be enforced."""
    kind, value = (_in_child if os.geteuid() == 0 else _enforced)(function, *args)
    if kind == "skip":
        pytest.skip(value)
    if kind == "error":
        pytest.fail(f"in the unprivileged child:\n{value}")
    return value


def _make_writable(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        if path.is_dir():
            path.chmod(stat.S_IRWXU)


@pytest.fixture
def freezing(tmp_path, monkeypatch):
    """A detector that makes ``targets`` read-only when its second fit starts (mid-run, after
    the first job finished): (the detector's class, the output folder). What cannot be written
    there goes to ``tmp_path / "elsewhere"`` (the temp folder)."""
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "elsewhere"))

    @register_detector("freezing_test")
    class Freezing(Detector):
        """Brightness as the anomaly score."""

        fits = 0
        targets: list[Path] = []

        def fit(self, train):
            type(self).fits += 1
            if type(self).fits == 2:
                for target in self.targets:
                    for path in [target, *target.rglob("*")]:
                        if path.is_dir():
                            path.chmod(stat.S_IRUSR | stat.S_IXUSR)
            self.mean_ = torch.stack([b.image.mean((0, 2, 3)) for b in train]).mean(0)

        def predict(self, batch):
            maps = (batch.image - self.mean_[:, None, None]).abs().mean(1)
            return Prediction(score=maps.flatten(1).amax(1), anomaly_map=maps)

    yield Freezing, tmp_path / "out"
    _make_writable(tmp_path)
    _REGISTRY.pop("freezing_test", None)


def _run_args(ad_root: Path, output: Path) -> tuple[str, ...]:
    return (
        *("run", "--detectors", "freezing_test", "--datasets", "mvtec_ad"),
        *("--root", str(ad_root), "--categories", "weave", "--seeds", "0,1,2"),
        *("--image-size", "64", "--num-workers", "0", "--bootstrap", "50", "--no-tracking"),
        *("--output", str(output), "--name", NAME),
    )


@pytest.mark.slow
def test_read_only_jobs_folder_fails_each_job_naming_the_path_and_goes_on(freezing, ad_root):
    cls, output = freezing
    jobs, failed = output / NAME / "jobs", output / NAME / "failed"
    cls.targets = [jobs, failed]
    result = unprivileged(bench, *_run_args(ad_root, output))
    err = _squash(result.stderr)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert [p.name for p in jobs.glob("*.json")] == ["freezing_test__mvtec_ad__weave__seed0.json"]
    for seed in (1, 2):
        record = jobs / f"freezing_test__mvtec_ad__weave__seed{seed}.json"
        failure = failed / f"freezing_test__mvtec_ad__weave__seed{seed}.txt"
        assert _squash(f"could not write {record}: Permission denied") in err
        # the failure file itself cannot be written either: named, the traceback kept elsewhere
        assert _squash(f"could not write {failure}: Permission denied") in err
    assert err.count(_squash("its metrics (not saved):")) == 2  # shown on screen
    kept = sorted((output.parent / "elsewhere").glob("bench-record-*.json"))
    records = sorted(json.loads(p.read_text())["run_name"][-5:] for p in kept)
    assert records == ["seed1", "seed2"]  # and each whole record written elsewhere
    assert all(_squash(f"its record is in {p}") in err for p in kept)
    summary = err[err.index(_squash("2 job(s) could not be saved: could not write to")) :]
    assert _squash(f"{jobs} (Permission denied)") in summary
    assert _squash(f"{failed} (Permission denied)") in summary
    assert _squash("2 job(s) failed: freezing_test/mvtec_ad/weave/seed1") in summary


@pytest.mark.slow
def test_read_only_benchmark_folder_reports_every_job_without_a_traceback(freezing, ad_root):
    cls, output = freezing
    cls.targets = [output / NAME]
    result = unprivileged(bench, *_run_args(ad_root, output))
    err = _squash(result.stderr)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert err.count(_squash("seed1: running")) == 1 and err.count(_squash("seed2: running")) == 1
    assert _squash("could not save the fitted state") in err  # the jobs go on from memory
    assert err.count(_squash("its metrics (not saved):")) == 2
    assert _squash("2 job(s) could not be saved") in err
    assert _squash(f"could not write {output / NAME / 'leaderboard.md'}: Permission denied") in err


# -- an empty scores file, and other `bench evaluate` inputs read without their name -----------
@pytest.fixture
def maps(tmp_path) -> Path:
    """An export folder with one category (the scores file is read before any map)."""
    (tmp_path / "maps" / "washer").mkdir(parents=True)
    return tmp_path / "maps"


COLUMNS = "expected a CSV file with the columns category,defect,id,score"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "is empty"),
        (b"category,defect,id,score\n", "holds no rows, only its header"),
        (b"category,defect,id,score\n\n\n", "holds no rows, only its header"),
        (b'category,defect,id,score\nwasher,"crack,000,1\n', "cannot be read as CSV"),
        (b"\xff\xfe\x00\x01garbage", "cannot be read as CSV"),
        (None, "does not exist"),
        ("folder", "is not a file"),
    ],
)
def test_an_unreadable_scores_file_is_one_line_naming_it(maps, ad_root, content, problem):
    scores = maps.parent / "scores.csv"
    if content == "folder":
        scores.mkdir()
    elif content is not None:
        scores.write_bytes(content)
    result = bench(
        *("evaluate", "--maps", str(maps), "--data", str(ad_root), "--categories", "washer"),
        *("--scores", str(scores), "--bootstrap", "0"),
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"bench: error: scores file {scores} {problem}")
    assert COLUMNS in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_missing_map_folder_is_one_line_naming_it(tmp_path, ad_root):
    result = bench("evaluate", "--maps", str(tmp_path / "nowhere"), "--data", str(ad_root))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"bench: error: anomaly-map folder {tmp_path / 'nowhere'} does not exist"
    )
    (tmp_path / "empty").mkdir()
    result = bench("evaluate", "--maps", str(tmp_path / "empty"), "--data", str(ad_root))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"bench: error: {tmp_path / 'empty'} holds no folder named")


def test_missing_maps_are_one_line_naming_them(maps, ad_root):
    result = bench(
        *("evaluate", "--maps", str(maps), "--data", str(ad_root), "--categories", "washer"),
        *("--bootstrap", "0"),
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("bench: error: category washer: 16 of 16 test images have no")
    assert str(maps / "washer" / "test") in result.stderr
