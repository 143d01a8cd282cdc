# Quick start:  make demo   (train MSF on Fashion-MNIST, 12-29 min on 2 CPU cores)
#               make test   (the test suite)
# Both create or reuse .venv, install what is missing, and make sure Fashion-MNIST is available.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FMNIST_DIR := /usr/share/datasets/fashion-mnist
# The interpreter of the input benchmark's torchvision side (one where torchvision imports; else PIL calls).
BENCH_REFERENCE_PYTHON ?= $(PY)

.PHONY: demo test test-fast data deps bench bench-deps reproduce parity bazel clean-venv

demo: deps data
	$(PY) -m cmsf_tf.train --flagfile=flags/demo.cfg

# Tests in TEST_WORKERS processes at once: much of a test's time is single-threaded (TensorFlow's import and
# tracing, XLA compiling, the CLIs' start-up), so two keep 2 cores busy (docs/tests.md).
TEST_WORKERS ?= 2

test: deps data
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest -q -W ignore::DeprecationWarning -n $(TEST_WORKERS) tests

# While developing: the unit tests only (no test that starts a Python process), a few minutes.
test-fast: deps data
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest -q -W ignore::DeprecationWarning -n $(TEST_WORKERS) -m "not e2e" tests

# Benchmarks (ratios measured in one run; bench/README.md). Installs the optional PyTorch,
# faiss and matplotlib of requirements-bench.txt, appends to bench/results.json, rewrites the table in bench/README.md.
bench: deps bench-deps
	mkdir -p bench
	$(PY) tools/bench_step.py --json=bench/results.json
	$(PY) tools/bench_step.py --nets=demo --methods=msf --intra_op=2 --processes=20 --rounds=3 --json=bench/results_processes.json
	$(PY) tools/bench_step.py --nets=demo --methods=msf --intra_op=2 --processes=6 --rounds=3 --busy_cores=1 --json=bench/results_processes.json
	$(PY) tools/bench_step.py --nets=resnet50 --methods=byol,cmsf_2q,cmsf_km --alternate_methods --no_torch --rounds=10 --steps=2 --json=bench/results_r50_alternating.json
	$(PY) tools/bench_step.py --nets=resnet50 --methods=byol,cmsf_sup,cmsf_pseudo --alternate_methods --no_torch --rounds=10 --steps=2 --json=bench/results_r50_alternating.json
	$(PY) tools/bench_step.py --nets=demo,resnet50 --methods=msf,cmsf_2q,cmsf_km --compare_multi_crop=6:12:96 --no_torch --json=bench/results_multi_crop.json
	$(PY) tools/bench_nn.py --json=bench/results.json
	$(PY) tools/profile_step.py --method=msf --json=bench/results.json
	$(PY) tools/profile_step.py --method=cmsf_2q --json=bench/results.json
	$(PY) tools/bench_input.py --reference_python=$(BENCH_REFERENCE_PYTHON) --json=bench/results.json
	$(PY) tools/bench_kmeans.py --json=bench/results.json
	$(PY) tools/bench_knn.py --n=200000 --queries=2000 --json=bench/results.json
	$(PY) tools/bench_serving.py --json=bench/results_serving.json --doc=bench/serving.md
	$(PY) tools/bench_report.py --results=bench/results.json --readme=bench/README.md

# Step parity with the authors' code: our train step of every method against its PyTorch transcription
# (tools/parity_torch.py), 5 steps from the same weights, views and state; writes results/parity/ and the
# golden files tests/test_parity.py checks without PyTorch. Needs torch (a test dependency). ~1 min.
parity: deps data
	$(PY) tools/parity.py --golden=tests/data/parity

# The Fashion-MNIST study behind docs/results.md: every method, several seeds
# (hours of CPU; resumable: run it again to continue). Writes results/fmnist/. Needs matplotlib.
reproduce: deps data
	$(PY) -m pip install -q matplotlib
	$(PY) tools/reproduce_small.py

# Bazel: Debian's bazel-bootstrap (4.2, from the Debian archive; offline with the stand-ins in tools/bazel),
# every target built, the ops and memory tests run through bazel test on the .venv interpreter.
bazel: deps data
	@command -v bazel >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's bazel-bootstrap"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bazel-bootstrap >/dev/null; \
	  else echo "error: bazel is not installed (as root: apt-get install bazel-bootstrap)" >&2; exit 2; fi; }
	bazel build //...
	bazel test //:test_ops //:test_memory

bench-deps: deps
	$(PY) -m pip install -q -r requirements-bench.txt

deps: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	touch $@

# Debian's dataset-fashion-mnist when we may install it; otherwise cmsf_tf falls back to
# keras.datasets.fashion_mnist, which downloads the files (needs internet).
data:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's dataset-fashion-mnist"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	  else \
	    echo "note: $(FMNIST_DIR) is absent; Fashion-MNIST will be downloaded through keras.datasets"; \
	  fi; \
	fi

clean-venv:
	rm -rf $(VENV)
