"""The console lines of a finished job."""

from __future__ import annotations

from typing import Any

from bench.metrics import headline
from bench.progress import console


def summary_line(record: dict[str, Any]) -> str:
    """One line of headline metrics for the console: image ones, then pixel or point ones."""
    m, t = record["metrics"]["all"], record["timings"]
    fit = "shared fit" if record.get("fit_shared") else f"{t['fit_seconds']:.1f}s fit"
    return f"{headline(m)}  ({fit}, {t['predict_images_per_second']:.1f} samples/s)"


def report_job(record: dict[str, Any]) -> None:
    """The console lines of a finished job: warnings, headline metrics, discovery."""
    for warning in record["warnings"]:
        console.print(f"[yellow]  {warning}[/]")
    console.print(summary_line(record))
    found = record.get("discovery") or {}
    if "nmi" in found:
        console.print(
            f"  anomaly types: NMI {found['nmi']:.3f}  ARI {found['ari']:.3f}  "
            f"F1 {found['f1']:.3f}  ({found['n_images']} defective images, "
            f"{found['n_types']} clusters)"
        )
