"""The CLI reports a user's mistake in one line and a bug as a bug: with its traceback, kept
in a log file, never dressed up as a config error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench import Detector, register_detector
from bench.cli import main
from bench.registry import _REGISTRY


@pytest.fixture
def buggy():
    """A detector whose parameter resolution has a bug (a KeyError at plan time)."""
    name = "buggy_resolve_test"

    @register_detector(name)
    class Buggy(Detector):
        """Fails while planning."""

        @classmethod
        def resolve_params(cls, params):
            return {**params, "size": params["missing"]}

    yield name
    _REGISTRY.pop(name, None)


def test_a_bug_shows_its_traceback_and_keeps_it_in_a_log(buggy, tmp_path, capsys):
    args = ["run", "--detectors", buggy, "--datasets", "builtin_ad", "--no-tracking"]
    with pytest.raises(KeyError, match="missing"):
        main([*args, "--output", str(tmp_path)])
    err = capsys.readouterr().err
    assert "bench: error" not in err
    assert "internal error (a bug" in err
    log = Path(re.search(r"in (\S+bench-crash-\S+\.txt)", err).group(1))
    text = log.read_text()
    log.unlink()
    assert "Traceback" in text and "resolve_params" in text and "KeyError: 'missing'" in text


def test_a_mistake_is_one_line_with_exit_code_2(tmp_path, capsys):
    code = main(["run", "--detectors", "no_such_detector", "--output", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("bench: error: unknown detector 'no_such_detector'")
    assert "Traceback" not in err


def test_run_flags_are_the_config_schema_fields():
    """Every config field marked as a flag is a ``bench run`` option writing that field."""
    import dataclasses

    from bench.cli.parser import build_parser
    from bench.config import BenchConfig

    run = build_parser()._subparsers._group_actions[0].choices["run"]
    dests = {a.dest for a in run._actions}
    flagged = {f.name for f in dataclasses.fields(BenchConfig) if "cli" in f.metadata}
    assert flagged <= dests
    assert {"seeds", "executor", "shot_files", "ray_address", "max_retries"} <= flagged
    unflagged = {f.name for f in dataclasses.fields(BenchConfig)} - flagged
    assert unflagged == {"detectors", "datasets"}  # chosen by --detectors / --datasets


@pytest.mark.parametrize(
    ("dataset", "extra", "message"),
    [
        ("builtin_loco", 'protocol = "fast"', "MVTec LOCO AD is scored with the official"),
        ("builtin_ad2", "", "pass --export-maps DIR"),
    ],
)
def test_a_dataset_s_own_scoring_is_checked_before_any_fit(
    tmp_path, capsys, dataset, extra, message
):
    options = "\noptions = { private_sets = true }" if dataset == "builtin_ad2" else ""
    config = tmp_path / "c.toml"
    config.write_text(
        f'name = "c"\n{extra}\n[[detectors]]\nname = "feature_stats"\n'
        f'[[datasets]]\nname = "{dataset}"{options}\n'
    )
    args = ["run", "--config", str(config), "--no-tracking", "--output", str(tmp_path)]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # nothing was fitted or recorded
