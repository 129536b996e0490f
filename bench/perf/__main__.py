import argparse

from bench.perf import metrics_perf

parser = argparse.ArgumentParser(prog="python -m bench.perf")
parser.add_argument("suite", choices=["metrics"])
parser.add_argument("--output", default="results/perf")
parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
parser.add_argument(
    "--anomalib-budget", type=float, default=600.0, help="seconds allowed per anomalib run"
)
args = parser.parse_args()
if args.suite == "metrics":
    metrics_perf.main(args.output, args.quick, args.anomalib_budget)
