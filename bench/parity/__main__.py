"""``python -m bench.parity METHOD --official PATH``: one method's parity table."""

import argparse
import importlib
import sys

METHODS = {
    "dinomaly": "bench.parity.dinomaly_parity",
    "dinomaly2": "bench.parity.dinomaly2_parity",
    "dictas": "bench.parity.dictas_parity",
    "knn": "bench.parity.knn_parity",
}

parser = argparse.ArgumentParser(prog="python -m bench.parity")
parser.add_argument("method", choices=sorted(METHODS))
parser.add_argument(
    "--official", help="checkout of the official repository (knn: of amazon-science's PatchCore)"
)
parser.add_argument("--output", default="results/parity")
args = parser.parse_args()
module = importlib.import_module(METHODS[args.method])
report = module.run(args.official)
command = " ".join(["python -m bench.parity", *sys.argv[1:]])
path = report.save(args.output, command)
print(report.markdown(command))
print(f"written to {path}")
sys.exit(0 if report.passed else 1)
