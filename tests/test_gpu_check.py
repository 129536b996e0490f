"""`make gpu-check`'s set-up, checked here without a GPU: it runs from an uninstalled checkout
with a python that has no mlflow, open3d or ray (an air-gapped GPU machine), collects every
CUDA test, and refuses to report GPU figures on a machine without a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

#: the python of an air-gapped GPU machine: this environment without the project installed
#: (its editable-install finder removed) and without mlflow, open3d and ray
AIR_GAPPED = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "Editable" not in getattr(f, "__name__", "")]
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mlflow", "open3d", "ray"):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Absent())
sys.argv = ["bench.gpu_check", *ARGS]
import runpy
runpy.run_module("bench.gpu_check", run_name="__main__")
"""


def _gpu_check(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    code = AIR_GAPPED.replace("ARGS", repr(args))
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
@pytest.mark.slow
def test_gpu_check_runs_from_an_air_gapped_checkout_and_collects_every_cuda_test(tmp_path):
    out = tmp_path / "perf"
    proc = _gpu_check(["--allow-cpu", "--output", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "has mlflow: no" in proc.stdout and "has open3d: no" in proc.stdout
    assert "bench/__init__.py" not in proc.stderr  # bench came from the checkout, no error
    # every test of tests/test_cuda.py was collected and skipped (no GPU here)
    skipped = proc.stdout.split(" skipped")[0].split()[-1]
    assert int(skipped) >= 6, proc.stdout[-2000:]  # metrics, curvature, AMP x3, detectors
    assert "skipped: ray is not installed here" in proc.stdout
    assert not out.exists() or not list(out.glob("gpu-*"))  # no GPU figure from a CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
@pytest.mark.slow
def test_gpu_check_refuses_a_machine_without_a_gpu(tmp_path):
    proc = _gpu_check(["--output", str(tmp_path)], tmp_path)
    assert proc.returncode == 2
    assert "sees no CUDA GPU on this machine" in proc.stderr
    assert not list(tmp_path.glob("gpu-*"))
