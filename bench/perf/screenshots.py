"""Screenshots of web pages as a new user sees them: headless Chromium, a fresh profile (no
local storage, so MLflow shows its defaults and every pop-up), 1600x1000.

Not part of the package (nothing imports it, ``python -m bench.perf`` does not list it): it
needs Playwright, kept out of the project's environment. How ``results/figures/mlflow-*.png``
were made (MLflow 3.17.2, Chromium 156 from Debian)::

    python3 -m venv /tmp/pw && /tmp/pw/bin/pip install playwright
    apt-get install -y chromium       # or Playwright's own: /tmp/pw/bin/playwright install chromium
    .venv/bin/bench run --config default --output /tmp/uishots    # ~30 min on 2 busy cores
    make ui RESULTS=/tmp/uishots PORT=5055 &                      # prints `bench links` first
    /tmp/pw/bin/python bench/perf/screenshots.py \
        --shot "<1st link>" results/figures/mlflow-runs-table.png "knn/builtin_ad/weave/seed0" \
        --shot "<3rd link>" results/figures/mlflow-compare-runs.png "image_auroc"

Any page works the same way, e.g. a fit run's training chart: ``--shot
"<base>/#/experiments/<id>/runs/<fit run id>/model-metrics?workflowType=machine_learning"
fit.png "train/loss"``.

A local file works as a ``file://`` URL, e.g. ``bench report --html``'s page, a section by its
anchor (how ``results/figures/report-*.png`` were made; ``--full-page``: the whole scrolled page,
not the viewport)::

    /tmp/pw/bin/python bench/perf/screenshots.py --size 1500x1000 \
        --shot "file://$PWD/results/<name>/report.html#images" report-images.png "Test images"

Each ``--shot URL OUTPUT TEXT`` loads URL in its own fresh context, waits until TEXT is shown
(a run name, a metric: proof that the page has rendered its data), lets the page settle and
writes the PNG; when TEXT does not show, it writes what the page showed to
``OUTPUT-timeout.png`` and fails. Nothing is clicked or dismissed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path


def capture(
    shots: list[tuple[str, str, str]],
    size: tuple[int, int] = (1600, 1000),
    executable: str | None = None,
    timeout_s: float = 60.0,
    settle_s: float = 2.0,
    full_page: bool = False,
) -> list[Path]:
    """Writes one PNG per (url, output path, text to wait for); returns the paths."""
    from playwright.sync_api import sync_playwright

    written = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            for url, output, text in shots:
                context = browser.new_context(
                    viewport={"width": size[0], "height": size[1]}, device_scale_factor=1
                )
                page = context.new_page()
                page.goto(url, wait_until="domcontentloaded", timeout=timeout_s * 1000)
                path = Path(output)
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    page.get_by_text(text).first.wait_for(timeout=timeout_s * 1000)
                except Exception:  # what the page showed instead, for the person to look at
                    shown = path.with_name(path.stem + "-timeout.png")
                    page.screenshot(path=str(shown))
                    raise TimeoutError(f"{text!r} not shown by {url} (the page: {shown})") from None
                try:
                    page.wait_for_load_state("networkidle", timeout=timeout_s * 1000)
                except Exception:  # a page that polls never idles; the text is there already
                    pass
                time.sleep(settle_s)  # charts and column widths animate in
                page.screenshot(path=str(path), full_page=full_page)
                written.append(path)
                print(f"{path}  ({url})")
                context.close()
        finally:
            browser.close()
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="screenshots.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shot",
        nargs=3,
        action="append",
        required=True,
        metavar=("URL", "OUTPUT", "TEXT"),
        help="page, PNG to write, text to wait for (repeatable)",
    )
    p.add_argument("--size", default="1600x1000", help="viewport WIDTHxHEIGHT")
    p.add_argument(
        "--executable",
        default=shutil.which("chromium") or shutil.which("chromium-browser"),
        help="Chromium binary (default: chromium on PATH, else Playwright's own)",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each TEXT")
    p.add_argument("--full-page", action="store_true", help="the whole page, not the viewport")
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    shots = [(url, out, text) for url, out, text in args.shot]
    capture(shots, (width, height), args.executable, args.timeout, full_page=args.full_page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
