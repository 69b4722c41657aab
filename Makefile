# The README's two commands: `make demo` and `make test`. Each sets itself up on a fresh machine.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# DeepSpeed JIT-builds C++ ops on first use; build them once into a cache the tests reuse.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export PYTHONUNBUFFERED := 1
# Keep tests within 2 cores: one intra-op thread per process.
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test lint format bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel here. Never let a dependency pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python launch/demo.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: setup lint
	$(BIN)/python -m pytest -q --durations=20 tests

# Every benchmark writes $(BENCH_RESULTS)/<name>.json; report.py then rewrites the marked tables
# of docs/benchmarks.md from those results (prose kept). ~10 min on 2 cores; a subset:
# `make bench BENCHES="loader step_overhead"` (only their tables change).
BENCHES ?= loader preprocess step_overhead pipeline checkpoint verify convert
BENCH_RESULTS ?= .cache/bench
bench: setup
	rm -rf $(BENCH_RESULTS) && mkdir -p $(BENCH_RESULTS)
	for b in $(BENCHES); do \
		$(BIN)/python tools/bench/$$b.py --results $(BENCH_RESULTS) || exit 1; \
	done
	$(BIN)/python tools/bench/report.py --results $(BENCH_RESULTS)

clean:
	rm -rf runs .cache build
