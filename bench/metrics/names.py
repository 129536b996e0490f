"""What the metrics are called: their version, the protocols, the headline metrics every
summary leads with and their console labels."""

from __future__ import annotations

METRIC_VERSION = "1.0"
PROTOCOLS = ("official", "fast")
#: the metrics every summary leads with, of those a job has (console lines, the printed
#: leaderboard, MLflow's runs view): image-level, then pixel-level or point-level; a dataset's own
#: official metrics (MVTec AD 2's AU-PRO to FPR 0.05 and SegF1, MVTec LOCO's AU-sPRO to 0.05)
#: where its evaluation reports them
HEADLINE = (
    "image_auroc",
    "pixel_auroc",
    "au_pro",
    "au_pro_05",
    "seg_f1",
    "au_spro_05",
    "pixel_ap",
    "point_auroc",
    "point_ap",
)
LABELS = {
    "image_auroc": "image AUROC",
    "pixel_auroc": "pixel AUROC",
    "au_pro": "AU-PRO",
    "au_pro_05": "AU-PRO@0.05",
    "seg_f1": "SegF1",
    "au_spro_05": "AU-sPRO@0.05",
    "pixel_ap": "pixel AP",
    "point_auroc": "point AUROC",
    "point_ap": "point AP",
}


def headline(metrics: dict[str, float]) -> str:
    """The headline metrics of one metrics group, as one console line."""
    return "".join(f"  {LABELS[k]} {metrics[k]:.4f}" for k in HEADLINE if k in metrics)


PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "au_pro")
IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1max")
