"""The MLflow UI as a new user meets it: the experiment's description and tags, `bench links`
into the model-training view of the latest benchmark run, and a real `mlflow ui` serving them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from bench.cli import main
from bench.ui import (
    JOBS_VIEW,
    LATEST_VIEW,
    NOTE_TAG,
    SHARED_VIEW_TAG,
    benchmark_links,
    describe_experiment,
    jobs_filter,
)

BIN = Path(sys.executable).parent


def _bench(*args: str) -> int:
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        return main(list(args))


@pytest.fixture(scope="module")
def store(tmp_path_factory, ad_root):
    """Three `bench run`s of one benchmark: feature_stats (2 jobs); feature_stats and the
    autoencoder (2 new jobs, feature_stats skipped); the same again (every job finished and
    logged before, so it opens no MLflow run). Returns (results folder, tracking URI, the 2nd
    run's jobs)."""
    out = tmp_path_factory.mktemp("results")
    common = ["--datasets", "mvtec_ad", "--root", str(ad_root), "--image-size", "64"]
    common += ["--name", "t", "--output", str(out), "--num-workers", "0"]
    ae = ["--param", "autoencoder.iterations=10", "--param", "autoencoder.width=4"]
    assert _bench("run", "--detectors", "feature_stats", *common) == 0
    assert _bench("run", "--detectors", "feature_stats,autoencoder", *common, *ae) == 0
    assert _bench("run", "--detectors", "feature_stats,autoencoder", *common, *ae) == 0
    uri = f"sqlite:///{out / 'mlflow.db'}"
    second = sorted(
        json.loads(p.read_text())["mlflow_run_id"] for p in (out / "t" / "jobs").glob("auto*.json")
    )
    assert len(second) == 2
    return out, uri, second


@pytest.mark.slow
def test_experiment_has_a_description_and_tags(store):
    _, uri, _ = store
    exp = MlflowClient(tracking_uri=uri).get_experiment_by_name("adbench/t")
    tags = exp.tags
    assert tags["adbench.benchmark"] == "t"
    assert tags["adbench.detectors"] == "feature_stats,autoencoder"  # merged over the runs
    assert tags["adbench.datasets"] == "mvtec_ad"
    assert tags["adbench.protocol"] == "official"
    note = tags[NOTE_TAG]
    for text in ("`t`", "`feature_stats`", "`autoencoder`", "`mvtec_ad`", "official"):
        assert text in note
    for text in ("adbench.kind = benchmark", "adbench.kind = job", "adbench.kind = fit"):
        assert text in note
    assert "detector/dataset/category/seedN" in note
    view = json.loads(tags[SHARED_VIEW_TAG + JOBS_VIEW])
    assert view["searchFilter"] == "tags.`adbench.kind` = 'job'"
    assert view["orderByKey"] == "tags.`mlflow.runName`"
    assert "metrics.`au_pro`" in view["selectedColumns"]


def test_describe_experiment_never_raises():
    describe_experiment(object(), "1", "t", {})  # not a client at all: ignored


@pytest.mark.slow
def test_links_point_at_the_latest_benchmark_run_with_jobs(store):
    _, uri, second = store
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.get_experiment_by_name("adbench/t").experiment_id
    parents = client.search_runs(
        [exp_id],
        filter_string="tags.`adbench.kind` = 'benchmark'",
        order_by=["attributes.start_time DESC"],
    )
    assert len(parents) == 2  # the third run had nothing to compute or log: no parent run
    latest_with_jobs = parents[0].info.run_id
    base = "http://127.0.0.1:5999/#/experiments/" + exp_id
    for name in ("t", None):
        links = benchmark_links(uri, "http://127.0.0.1:5999/", name)
        assert len(links) == 4
        urls = [url for _, url in links]
        for url in urls:
            assert url.startswith("http://127.0.0.1:5999/#/")
            assert url.endswith("workflowType=machine_learning")
        table, jobs, compare, board = urls
        assert table == f"{base}/runs?viewStateShareKey={JOBS_VIEW}&workflowType=machine_learning"
        assert jobs == f"{base}/runs?viewStateShareKey={LATEST_VIEW}&workflowType=machine_learning"
        tags = client.get_experiment(exp_id).tags
        view = json.loads(tags[SHARED_VIEW_TAG + LATEST_VIEW])  # stored by benchmark_links
        assert view["searchFilter"] == jobs_filter(latest_with_jobs)
        assert (
            view["selectedColumns"]
            == json.loads(tags[SHARED_VIEW_TAG + JOBS_VIEW])["selectedColumns"]
        )
        assert compare.startswith("http://127.0.0.1:5999/#/compare-runs?runs=")
        query = urllib.parse.parse_qs(compare.split("?", 1)[1])
        assert sorted(json.loads(query["runs"][0])) == second
        assert json.loads(query["experiments"][0]) == [exp_id]
        assert board == (
            f"{base}/runs/{latest_with_jobs}/artifacts/leaderboard.png"
            "?workflowType=machine_learning"
        )
    assert benchmark_links(uri, "http://x", "no-such-benchmark") == []


@pytest.mark.slow
def test_links_without_the_shared_views_are_plain_tables(store, monkeypatch):
    """A server that does not let us store the views: the runs table folded by parent, and
    the latest run's jobs by search filter and sort in the URL (flat, default columns)."""
    _, uri, _ = store
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("adbench/t")
    views = {k: v for k, v in exp.tags.items() if k.startswith(SHARED_VIEW_TAG)}
    assert set(views) == {SHARED_VIEW_TAG + JOBS_VIEW, SHARED_VIEW_TAG + LATEST_VIEW}
    for key in views:
        client.delete_experiment_tag(exp.experiment_id, key)
    try:

        def refuse(*args, **kwargs):
            raise PermissionError("read-only")

        monkeypatch.setattr(MlflowClient, "set_experiment_tag", refuse)
        table, jobs, *_ = [url for _, url in benchmark_links(uri, "http://x", "t")]
        assert (
            table
            == f"http://x/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
        )
        query = urllib.parse.parse_qs(jobs.split("?", 1)[1])
        parent = json.loads(views[SHARED_VIEW_TAG + LATEST_VIEW])["searchFilter"]
        assert query["searchFilter"] == [parent]
        assert query["orderByKey"] == ["tags.`mlflow.runName`"]  # flat, not folded
    finally:
        monkeypatch.undo()
        for key, value in views.items():
            client.set_experiment_tag(exp.experiment_id, key, value)


@pytest.mark.slow
def test_links_command_prints_labelled_links(store, tmp_path, capsys):
    out, _, second = store
    assert _bench("links", "--output", str(out), "--base-url", "http://127.0.0.1:5001") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8
    labels, urls = lines[::2], [line.strip() for line in lines[1::2]]
    assert all(u.startswith("http://127.0.0.1:5001/#/") for u in urls)
    assert "2 job runs" in labels[1] and all(rid in urls[2] for rid in second)
    assert _bench("links", "--output", str(tmp_path)) == 1  # empty results folder
    assert "make bench" in capsys.readouterr().out
    assert not (tmp_path / "mlflow.db").exists()  # nor does it create a store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read()


@pytest.mark.slow
def test_mlflow_ui_serves_the_links_and_the_description(store):
    out, uri, second = store
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(  # as `make ui` starts it
        [str(BIN / "mlflow"), "ui", "--backend-store-uri", uri]
        + ["--host", "127.0.0.1", "--port", str(port)],
        cwd=out,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its workers go with it
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                _get(f"{base}/health")
                break
            except OSError:
                assert proc.poll() is None, "mlflow ui exited at start-up"
                assert time.time() < deadline, "mlflow ui did not come up within 120 s"
                time.sleep(0.5)
        links = benchmark_links(uri, base, "t")
        for _, url in links:
            status, body = _get(url.split("#", 1)[0])
            assert status == 200 and b"<html" in body.lower()
        exp_id = links[0][1].split("/experiments/")[1].split("/")[0]
        status, body = _get(f"{base}/ajax-api/2.0/mlflow/experiments/get?experiment_id={exp_id}")
        assert status == 200
        tags = {t["key"]: t["value"] for t in json.loads(body)["experiment"]["tags"]}
        assert "adbench benchmark `t`" in tags[NOTE_TAG]
        # the UI reads the shared view of the second link from the experiment and sends its
        # searchFilter to the server as it is
        assert f"viewStateShareKey={LATEST_VIEW}" in links[1][1]
        search = json.loads(tags[SHARED_VIEW_TAG + LATEST_VIEW])["searchFilter"]
        request = urllib.request.Request(
            f"{base}/ajax-api/2.0/mlflow/runs/search",
            data=json.dumps({"experiment_ids": [exp_id], "filter": search}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            found = json.loads(response.read())["runs"]
        assert sorted(r["info"]["run_id"] for r in found) == second
        parent_id = links[3][1].split("/runs/")[1].split("/")[0]  # the leaderboard it shows
        status, body = _get(f"{base}/get-artifact?path=leaderboard.png&run_uuid={parent_id}")
        assert status == 200 and body.startswith(b"\x89PNG")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
