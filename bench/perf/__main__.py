import argparse

from bench.perf import (
    casl_perf,
    category_perf,
    curvature_perf,
    dictas_perf,
    dinomaly_perf,
    knn_perf,
    metrics_perf,
)

parser = argparse.ArgumentParser(prog="python -m bench.perf")
parser.add_argument(
    "suite",
    choices=[
        "metrics",
        "metrics-memory",
        "aupimo",
        "bootstrap",
        "knn",
        "curvature",
        "category",
        "casl",
        "casl-curve",
        "dinomaly",
        "dictas",
        "ray",
    ],
)
parser.add_argument("--output", default="results/perf")
parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
parser.add_argument(
    "--anomalib-budget",
    type=float,
    help="seconds allowed per anomalib run (default: 600 for metrics and aupimo, 5400 for knn)",
)
parser.add_argument("--data", default="../shared/data/mvtec_ad", help="MVTec AD root (knn)")
parser.add_argument("--category", default="bottle", help="MVTec AD category (knn)")
parser.add_argument(
    "--baseline", help="metrics-memory: a git revision whose bench/ is measured too, as 'before'"
)
parser.add_argument("--maps", help="bootstrap: exported maps of bottle (official layout)")
parser.add_argument("--resamples", type=int, default=1000, help="bootstrap: B (default 1000)")
args = parser.parse_args()
if args.suite == "metrics":
    metrics_perf.main(args.output, args.quick, args.anomalib_budget or 600.0)
if args.suite == "metrics-memory":
    from bench.perf import metrics_memory

    metrics_memory.main(args.output, args.quick, args.baseline)
if args.suite == "aupimo":
    from bench.perf import aupimo_perf

    aupimo_perf.main(args.output, args.quick, args.anomalib_budget or 600.0)
if args.suite == "bootstrap":
    from bench.perf import bootstrap_perf

    bootstrap_perf.main(args.output, args.quick, args.data, args.maps, args.resamples)
if args.suite == "knn":
    knn_perf.main(args.output, args.data, args.category, args.anomalib_budget or 5400.0)
if args.suite == "curvature":
    curvature_perf.main(args.output)
if args.suite == "category":
    category_perf.main(args.output, args.quick)
if args.suite == "casl":
    casl_perf.main(args.output, args.quick)
if args.suite == "casl-curve":
    from bench.perf import casl_curve

    casl_curve.main(args.output, args.quick)
if args.suite == "dinomaly":
    dinomaly_perf.main(args.output, args.quick, args.anomalib_budget or 3600.0)
if args.suite == "dictas":
    dictas_perf.main(args.output, args.quick)
if args.suite == "ray":
    from bench.perf import ray_perf

    ray_perf.main(args.output, args.quick)
