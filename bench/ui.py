"""What a person sees of a benchmark in the MLflow UI: the experiment's description and tags,
and direct links into the model-training view.

MLflow 3.17 opens an experiment in its GenAI view (traces, sessions, judges) unless the URL
carries ``workflowType=machine_learning``; the choice is read from the URL, else from the
browser's local storage (GenAI by default), never from the experiment (its
``mlflow.experimentKind`` tag is not consulted), so :func:`benchmark_links` builds URLs that
carry it. The routes are those of the UI's hash router: ``/#/experiments/<id>/runs`` (the runs
table: ``searchFilter`` is its search box, ``orderByKey``/``orderByAsc`` its sort; sorted by
anything but the start time it lists child runs flat instead of folded under their parents),
``/#/compare-runs?runs=[...]&experiments=[...]`` (``runs`` must come first: the page reads it
as the key ``?runs``) and ``/#/experiments/<id>/runs/<run id>[/artifacts/<path>]``. Which
columns the table shows cannot be put in a URL; a shared view can: ``?viewStateShareKey=K``
(with no search or sort parameter beside it) loads the JSON in the experiment tag
``mlflow.sharedViewState.K`` (search, sort, columns, their order and widths; MLflow shows a
banner saying it is a shared view). :func:`describe_experiment` stores :data:`JOBS_VIEW`,
:func:`benchmark_links` :data:`LATEST_VIEW`.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Experiment, Run

#: the query parameter that selects the model-training view of the MLflow 3.x UI
ML_VIEW = ("workflowType", "machine_learning")
NOTE_TAG = "mlflow.note.content"  # what the UI shows as the experiment's description
_JOB_FILTER = "tags.`adbench.kind` = 'job'"
_BY_NAME = {"orderByKey": "tags.`mlflow.runName`", "orderByAsc": "true"}
#: the shared views (runs table: flat, by name, the leaderboard's headline metrics as columns)
#: of every job run and of the latest benchmark run's jobs
JOBS_VIEW, LATEST_VIEW = "adbench-jobs", "adbench-latest"
SHARED_VIEW_TAG = "mlflow.sharedViewState."


def _names(entries: list[Any], key: str) -> list[str]:
    """The names of config entries (dicts as BenchConfig.to_dict gives them, or strings)."""
    out: list[str] = []
    for entry in entries or []:
        name = (entry.get(key) or entry.get("name")) if isinstance(entry, dict) else entry
        if name and str(name) not in out:
            out.append(str(name))
    return out


def _merged(previous: str | None, new: list[str]) -> list[str]:
    """The names tagged by earlier runs of the experiment followed by this run's new ones."""
    old = [n for n in (previous or "").split(",") if n]
    return old + [n for n in new if n not in old]


def experiment_description(
    benchmark: str, detectors: list[str], datasets: list[str], protocols: list[str], config: dict
) -> str:
    """The Markdown description of a benchmark's experiment."""
    seeds = ", ".join(str(s) for s in config.get("seeds") or [0])
    categories = config.get("categories")
    lines = [
        f"**adbench benchmark `{benchmark}`**: anomaly detectors scored on MVTec-style data "
        "(image AUROC, pixel AUROC, AU-PRO, AP), the same numbers as "
        f"`results/{benchmark}/leaderboard.md`.",
        "",
    ]
    if detectors:  # a sync (no configuration known) leaves the lists out
        lines += [
            f"- detectors: {', '.join(f'`{d}`' for d in detectors)}",
            f"- datasets: {', '.join(f'`{d}`' for d in datasets) or '-'}"
            + (f" (categories: {', '.join(categories)})" if categories else ""),
            f"- protocol: {', '.join(protocols) or '-'}; seeds: {seeds}",
            "",
        ]
    lines += [
        "How the runs are organised:",
        f"- a parent run per `bench run` (named `{benchmark}`, tag `adbench.kind = benchmark`) "
        "holding the leaderboard (`leaderboard.md`, `leaderboard.png`) and `config.json`;",
        "- a child run per job, `detector/dataset/category/seedN` (tag `adbench.kind = job`), "
        "with every metric (per defect type under `defect.<type>.*`), timings, peak memory, "
        "`per_defect.csv`, `curves.png` and the resolved `config.json`;",
        "- a fit run per training of a trainable detector (tag `adbench.kind = fit`), also a "
        "child of the `bench run` that trained it, with its training curves (model metrics by "
        "step) and `training_curve.png`.",
        "",
        "Expand a parent run in the runs table to see its jobs, or select job runs and press "
        "Compare. This is the model-training view (`?workflowType=machine_learning` in the URL); "
        "`bench links` (printed by `make ui`) gives direct links to the latest benchmark run.",
    ]
    return "\n".join(lines)


def jobs_view(search_filter: str = _JOB_FILTER) -> str:
    """A runs-table view state (JSON) for a shared view: the job runs that ``search_filter``
    selects (every job run by default), one row each, sorted by name, with the leaderboard's
    headline metrics as columns."""
    from bench.metrics import HEADLINE

    metrics = [f"metrics.`{m}`" for m in HEADLINE]
    view = {
        "searchFilter": search_filter,
        "orderByKey": _BY_NAME["orderByKey"],
        "orderByAsc": True,
        "selectedColumns": metrics,
        "columnOrder": ["attributes.`Run Name`", *metrics],
        "columnWidths": {"attributes.`Run Name`": 280, **{m: 100 for m in metrics}},
    }
    return json.dumps(view)


def _store_view(client: MlflowClient, exp: Experiment, key: str, view: str) -> bool:
    """Whether the experiment holds ``view`` as shared view ``key`` (stored now if need be)."""
    if exp.tags.get(SHARED_VIEW_TAG + key) == view:
        return True
    try:
        client.set_experiment_tag(exp.experiment_id, SHARED_VIEW_TAG + key, view)
        return True
    except Exception:  # a server that does not let us write: links without the view
        return False


def describe_experiment(
    client: MlflowClient, experiment_id: str, benchmark: str, config: dict
) -> None:
    """Sets the experiment's description (``mlflow.note.content``), tags
    ``adbench.benchmark``, ``adbench.detectors``, ``adbench.datasets``, ``adbench.protocol``
    (comma-separated, merged with those of earlier runs) and the shared view
    :data:`JOBS_VIEW`; ``config`` is ``BenchConfig.to_dict()``. Never raises: tracking does not
    fail because of it."""
    try:
        previous = client.get_experiment(experiment_id).tags or {}
        if not config.get("detectors") and previous.get(NOTE_TAG):
            return  # a sync knows no configuration: the description of its runs stays
        known = bool(config.get("detectors"))
        detectors = _merged(
            previous.get("adbench.detectors"), _names(config.get("detectors", []), "label")
        )
        datasets = _merged(previous.get("adbench.datasets"), _names(config.get("datasets", []), ""))
        protocols = _merged(previous.get("adbench.protocol"), [config["protocol"]] if known else [])
        lists = {
            "adbench.detectors": detectors,
            "adbench.datasets": datasets,
            "adbench.protocol": protocols,
        }
        tags = {
            "adbench.benchmark": benchmark,
            **{key: ",".join(names) for key, names in lists.items() if names},
            # what the experiment is, for MLflow clients that read it (the 3.17 UI does not)
            "mlflow.experimentKind": "custom_model_development",
            NOTE_TAG: experiment_description(benchmark, detectors, datasets, protocols, config),
            SHARED_VIEW_TAG + JOBS_VIEW: jobs_view(),
        }
        for key, value in tags.items():
            if previous.get(key) != value:
                client.set_experiment_tag(experiment_id, key, value)
    except Exception:
        pass


def runs_table_url(base_url: str, experiment_id: str, **query: str) -> str:
    """The experiment's runs table in the model-training view, with more of its query
    parameters (``searchFilter``, ``orderByKey``, ``viewStateShareKey``...)."""
    params = urlencode({**query, ML_VIEW[0]: ML_VIEW[1]}, quote_via=quote)
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{params}"


def compare_url(base_url: str, experiment_id: str, run_ids: list[str]) -> str:
    """The compare page of ``run_ids`` (``runs`` first: the page parses it as ``?runs``)."""
    runs = quote(json.dumps(run_ids, separators=(",", ":")), safe="")
    experiments = quote(json.dumps([experiment_id]), safe="")
    return (
        f"{base_url.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}"
        f"&{ML_VIEW[0]}={ML_VIEW[1]}"
    )


def run_url(base_url: str, experiment_id: str, run_id: str, artifact: str | None = None) -> str:
    """A run's page in the model-training view, or one of its artifacts shown on its
    Artifacts tab."""
    tab = f"/artifacts/{quote(artifact)}" if artifact else ""
    return (
        f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}{tab}"
        f"?{ML_VIEW[0]}={ML_VIEW[1]}"
    )


def jobs_filter(parent_id: str) -> str:
    """The search filter of a benchmark run's job runs."""
    return f"tags.`mlflow.parentRunId` = '{parent_id}' and {_JOB_FILTER}"


def latest_benchmark(
    client: MlflowClient, name: str | None = None
) -> tuple[Experiment, Run, list[Run]] | None:
    """(experiment, parent run, its job runs) of the newest benchmark run that logged jobs
    (a ``bench run`` that only skipped finished jobs logs none), in ``adbench/<name>`` or, with
    no name, in every ``adbench/*`` experiment; None when there is none."""
    from mlflow.entities import ViewType

    if name is not None:
        exp = client.get_experiment_by_name(f"adbench/{name}")
        experiments = [exp] if exp is not None and exp.lifecycle_stage == "active" else []
    else:
        experiments = client.search_experiments(
            view_type=ViewType.ACTIVE_ONLY, filter_string="name LIKE 'adbench/%'"
        )
    if not experiments:
        return None
    by_id = {e.experiment_id: e for e in experiments}
    parents = client.search_runs(
        list(by_id),
        filter_string="tags.`adbench.kind` = 'benchmark'",
        order_by=["attributes.start_time DESC"],
        max_results=200,
    )
    for parent in parents:
        exp_id = parent.info.experiment_id
        jobs = client.search_runs(
            [exp_id], filter_string=jobs_filter(parent.info.run_id), max_results=5000
        )
        if jobs:
            jobs.sort(key=lambda r: r.info.run_name or "")
            return by_id[exp_id], parent, jobs
    return None


def benchmark_links(
    tracking_uri: str, base_url: str, name: str | None = None
) -> list[tuple[str, str]]:
    """(label, URL) of the latest benchmark run (see :func:`latest_benchmark`) in the UI
    served at ``base_url``, all in the model-training view: every job run of its experiment in
    the runs table, the job runs of that benchmark run, the compare page of those, and its
    leaderboard (the parent run's ``leaderboard.png``, else the run's page). Empty when the
    store holds none. The two tables are shared views (:data:`JOBS_VIEW`, :data:`LATEST_VIEW`,
    stored on the experiment here if missing, so that they show the metrics as columns); where
    they cannot be stored, plain table URLs (the first then folds the jobs under their parents,
    the second has no metric columns)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = latest_benchmark(client, name)
    if found is None:
        return []
    exp, parent, jobs = found
    exp_id, parent_id = exp.experiment_id, parent.info.run_id
    ids = [r.info.run_id for r in jobs]
    label = f"every job run of {exp.name}, one row each with the leaderboard metrics"
    if _store_view(client, exp, JOBS_VIEW, jobs_view()):
        table = (label, runs_table_url(base_url, exp_id, viewStateShareKey=JOBS_VIEW))
    else:
        table = (
            f"runs table of {exp.name}: a parent run per `bench run` (expand one for its jobs)",
            runs_table_url(base_url, exp_id),
        )
    started = datetime.fromtimestamp(parent.info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
    label = f"the {len(ids)} job runs of the latest `bench run` ({started})"
    if _store_view(client, exp, LATEST_VIEW, jobs_view(jobs_filter(parent_id))):
        latest = runs_table_url(base_url, exp_id, viewStateShareKey=LATEST_VIEW)
    else:
        latest = runs_table_url(base_url, exp_id, searchFilter=jobs_filter(parent_id), **_BY_NAME)
    try:
        files = {a.path for a in client.list_artifacts(parent_id)}
    except Exception:
        files = set()
    board = (
        ("its leaderboard (leaderboard.png; leaderboard.md beside it)", "leaderboard.png")
        if "leaderboard.png" in files
        else ("its parent run (leaderboard.md, leaderboard.png, config.json)", None)
    )
    return [
        table,
        (label, latest),
        (f"compare those {len(ids)} job runs side by side", compare_url(base_url, exp_id, ids)),
        (board[0], run_url(base_url, exp_id, parent_id, board[1])),
    ]
