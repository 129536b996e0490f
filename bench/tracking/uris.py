"""Where the MLflow runs go, and a fast check that a tracking server is up."""

from __future__ import annotations

import os
from pathlib import Path

from bench.config import BenchConfig


def default_tracking_uri(output: str | Path) -> str:
    """The default store: ``sqlite:///<output>/mlflow.db``."""
    return f"sqlite:///{(Path(output) / 'mlflow.db').resolve()}"


def resolve_tracking_uri(cfg: BenchConfig) -> str:
    """The config's ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else the default store."""
    return (
        cfg.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or default_tracking_uri(cfg.output)
    )


def probe(uri: str, timeout: float = 5.0) -> None:
    """Fails fast (instead of MLflow's minutes of retries) when a tracking server is down."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except OSError as err:
        raise ConnectionError(f"tracking server {uri} is unreachable ({err})") from err
