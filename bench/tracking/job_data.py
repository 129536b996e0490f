"""What a finished job's record becomes in MLflow: its run's tags, params, metrics and
resolved configuration, the per-defect-type table and the ROC / PRO figure, and the logging
of its artifacts."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from bench.scopes import references_text
from bench.tracking.process import git_state

#: what identifies a job's setting, logged as params and in its config.json
JOB_FIELDS = (
    "detector_name",
    "dataset",
    "category",
    "seed",
    "image_size",
    "crop_size",
    "batch_size",
    "protocol",
)


def scope_params(record: dict[str, Any]) -> dict[str, str]:
    """The fit scope of a job as MLflow params (records from before fit scopes: per-category)."""
    scope = record.get("scope") or {}
    out = {"fit": record.get("fit_label", "per-category")}
    if scope.get("train_on"):
        out["train_on"] = scope["train_on"]["dataset"]
    if record.get("draw") is not None:
        out["draw"] = str(record["draw"])
        out["shots"] = str(scope.get("shots"))
    return out


def job_tags(record: dict[str, Any], parent_id: str | None) -> dict[str, Any]:
    """The tags of a job's run, a child of ``parent_id``."""
    return {
        "mlflow.parentRunId": parent_id,
        "adbench.kind": "job",
        "config_hash": record["config_hash"],
        "fit_hash": record.get("fit_hash", ""),
        "fit": record.get("fit_label", "per-category"),
        "data_fingerprint": record.get("data_fingerprint", "unknown"),
        "protocol": record["protocol"],
        "metric_version": record["metric_version"],
        "device": record["device"],
        **(
            {"adbench.substitutes": "; ".join(record["substitutes"])}
            if record.get("substitutes")
            else {}
        ),
        **({"adbench.transductive": record["transductive"]} if record.get("transductive") else {}),
        **git_state(),
        **{f"version.{k}": str(v) for k, v in record["versions"].items()},
    }


def job_params(record: dict[str, Any]) -> dict[str, str]:
    """The params of a job's run: the detector's (``detector.*``), the setting and the scope."""
    params = {f"detector.{k}": str(v)[:500] for k, v in record["params"].items()}
    params.update({k: str(record[k]) for k in ("detector", *JOB_FIELDS)})
    params["resampling"] = record.get("resampling", "tensor")  # none before the choice
    params.update(scope_params(record))
    return params


def job_config(record: dict[str, Any]) -> dict[str, Any]:
    """The job's resolved configuration, its run's ``config.json``."""
    keys = (*JOB_FIELDS, "params", "root", "metric_version", "config_hash")
    resolved = {k: record[k] for k in keys}
    resolved["resampling"] = record.get("resampling", "tensor")
    for key in ("fit_label", "scope", "fit", "draw", "references", "references_root"):
        if key in record:
            resolved[key] = record[key]
    return resolved


def curves_figure(record: dict[str, Any], path: Path) -> Path:
    """ROC and PRO curves of a job (subset "all") as a PNG, the AU-PRO limit marked; the point
    ROC alone for unorganised clouds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, m = record["curves"], record["metrics"]["all"]
    level = "point" if "point_auroc" in m else "pixel"
    fig, axes = plt.subplots(1, 2 if "pro" in c else 1, figsize=(9, 4), squeeze=False)
    roc = axes[0, 0]
    roc.plot(c["fpr"], c["tpr"])
    roc.plot([0, 1], [0, 1], ls=":", c="grey")
    roc.set(xlabel="false positive rate", ylabel="true positive rate")
    roc.set_title(f"{level} ROC (AUROC {m[level + '_auroc']:.4f})")
    if "pro" in c:
        pro = axes[0, 1]
        pro.plot(c["fpr"], c["pro"])
        pro.axvline(0.3, ls="--", c="grey")
        pro.set(xlabel="false positive rate", ylabel="per-region overlap", xlim=(0, 1))
        pro.set_title(f"PRO (AU-PRO@0.3 {m['au_pro']:.4f})")
    fig.suptitle(record["run_name"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _job_span_ms(record: dict[str, Any]) -> tuple[int | None, int | None]:
    """(end, start) of the job itself in epoch milliseconds, so MLflow shows its real duration
    rather than the moment it was logged (None when the record lacks the times)."""
    import datetime as dt

    try:
        end = dt.datetime.fromisoformat(record["finished"]).timestamp()
        t = record["timings"]
        spent = t["fit_seconds"] + t["predict_seconds"] + t["eval_seconds"]
    except (KeyError, TypeError, ValueError):
        return None, None
    return int(end * 1000), int((end - spent) * 1000)


def per_defect_table(record: dict[str, Any]):
    """One row per defect-type subset ("all" first) with every metric of the job."""
    import pandas as pd

    rows = [{"subset": name, **values} for name, values in record["metrics"].items()]
    rows.sort(key=lambda r: (r["subset"] != "all", r["subset"]))
    return pd.DataFrame(rows)


def flat_metrics(record: dict[str, Any]) -> dict[str, float]:
    """Every metric of a job as one MLflow metric each (``defect.<type>.*`` per defect type;
    ``<metric>_ci_low`` / ``_ci_high`` its 95% interval), with the type-discovery scores, timings, peak memory and skipped training steps."""
    out = {}
    for group, values in record["metrics"].items():
        prefix = "" if group == "all" else f"defect.{group}."
        for k, v in values.items():
            if v == v:  # MLflow rejects NaN in some stores; undefined values are left out
                out[prefix + k] = float(v)
    for k, (low, high) in ((record.get("ci") or {}).get("metrics") or {}).items():
        if low == low and high == high:  # the 95% interval of an overall metric
            out[f"{k}_ci_low"], out[f"{k}_ci_high"] = float(low), float(high)
    for k in ("nmi", "ari", "f1", "n_types"):
        value = (record.get("discovery") or {}).get(k)
        if value is not None:
            out[f"type_{k}"] = float(value)
    for k, v in {**record["timings"], **record["memory"]}.items():
        if v is not None:
            out[k] = float(v)
    if record.get("skipped_steps") is not None:  # a trained detector's skipped optimiser steps
        out["train_skipped_steps"] = float(record["skipped_steps"])
    return out


def log_job_artifacts(client: Any, rid: str, record: dict[str, Any]) -> None:
    """Logs to run ``rid`` the job's per-defect-type table, its resolved configuration, its
    references, overlays and curves figure."""
    client.log_text(rid, per_defect_table(record).to_csv(index=False), "per_defect.csv")
    client.log_dict(rid, job_config(record), "config.json")
    if record.get("references"):
        header = f"references of {record['run_name']} (replay: --shot-file references.txt)"
        listed = record.get("fit_references") or record["references"]
        text = references_text(record["references_root"], listed, header)
        client.log_text(rid, text, "references.txt")
    if record.get("overlays") and Path(record["overlays"]).is_file():
        client.log_artifact(rid, record["overlays"], "overlays")
    if record.get("curves"):
        with tempfile.TemporaryDirectory() as tmp:
            figure = curves_figure(record, Path(tmp) / "curves.png")
            client.log_artifact(rid, str(figure))
