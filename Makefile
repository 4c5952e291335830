# Fresh machine: `make run` (the main job) or `make test` (the test suite). Both set up .venv first.
# On GPU machines pick the torch build you need: `make test TORCH_SPEC="torch==2.11.0"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup run test test-fast bench clean

setup: $(VENV)/.installed

# torch goes in first and pinned: an unpinned torch (asked for by any dependency) pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[all]"
	touch $@

run: setup
	$(BIN)/toss run configs/quick.yaml

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python benchmarks/bench_select.py
	$(BIN)/python benchmarks/bench_score.py

clean:
	rm -rf $(VENV) store .pytest_cache
