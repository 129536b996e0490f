"""Command line: ``bench list``, ``run``, ``evaluate``, ``report``, ``compare``, ``sync``,
``links`` and ``download``."""

from __future__ import annotations

import sys
from pathlib import Path

from bench.cli.commands import (
    cmd_compare,
    cmd_download,
    cmd_evaluate,
    cmd_links,
    cmd_list,
    cmd_report,
    cmd_run,
    cmd_sync,
)
from bench.cli.parser import build_parser
from bench.cli.run_config import config_from_args
from bench.errors import USER_ERRORS

__all__ = ["build_parser", "config_from_args", "main"]


COMMANDS = {
    "list": cmd_list,
    "run": cmd_run,
    "evaluate": cmd_evaluate,
    "report": cmd_report,
    "compare": cmd_compare,
    "sync": cmd_sync,
    "links": cmd_links,
    "download": cmd_download,
}


def main(argv: list[str] | None = None) -> int:
    """Runs one command. A user's mistake (:data:`bench.errors.USER_ERRORS`) is one line and
    exit code 2; anything else is a bug: its traceback is printed and kept in a log file."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        resumable = args.command in ("run", "download")
        hint = "; re-run the same command to resume" if resumable else ""
        print(f"bench: interrupted{hint}", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        log = crash_log(err)
        print(
            f"bench: internal error (a bug, not a mistake in your setup; the traceback is above "
            f"and in {log})",
            file=sys.stderr,
        )
        raise


def crash_log(err: BaseException) -> Path:
    """Writes the full traceback of an unexpected error to a file in the temp folder."""
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix="bench-crash-", suffix=".txt")
    with open(fd, "w", encoding="utf-8") as log:
        log.write("".join(traceback.format_exception(err)))
    return Path(path)
