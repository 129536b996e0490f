"""What the metrics are called: their version, the protocols, the headline metrics every
summary leads with and their console labels."""

from __future__ import annotations

METRIC_VERSION = "1.0"
PROTOCOLS = ("official", "fast")
#: the metrics every summary leads with, of those a job has (console lines, the printed
#: leaderboard, MLflow's runs view): image-level, then pixel-level or point-level
HEADLINE = ("image_auroc", "pixel_auroc", "au_pro", "pixel_ap", "point_auroc", "point_ap")
LABELS = {
    "image_auroc": "image AUROC",
    "pixel_auroc": "pixel AUROC",
    "au_pro": "AU-PRO",
    "pixel_ap": "pixel AP",
    "point_auroc": "point AUROC",
    "point_ap": "point AP",
}


def headline(metrics: dict[str, float]) -> str:
    """The headline metrics of one metrics group, as one console line."""
    return "".join(f"  {LABELS[k]} {metrics[k]:.4f}" for k in HEADLINE if k in metrics)


PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "au_pro")
IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1max")
