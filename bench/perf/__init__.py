"""Benchmarks behind ``make perf``: numbers go to ``results/perf/``, never into unit tests."""

import json
from pathlib import Path


def save(output: str | Path, name: str, results: dict, markdown: str) -> Path:
    """Writes ``<output>/<name>.json`` (the numbers) and ``<name>.md`` (the table); returns the
    Markdown file."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    path = out / f"{name}.md"
    path.write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    return path
