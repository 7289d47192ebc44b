# `make train` and `make test` create .venv and install the project when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test test-fast lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision first, pinned to the releases this machine serves from disk;
	# pyproject only asks for ranges, so GPU users get their own builds.
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/pip install -q torch torchvision
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/sidpipe train $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check sidpipe tests benchmarks
	$(BIN)/ruff format --check sidpipe tests benchmarks
	$(BIN)/lint-imports

# Both tiers: the in-process one and the real multi-process one (pipelines, torchrun, CLI),
# in PYTEST_WORKERS pytest-xdist workers, one file per worker at a time (loadfile: a module's
# fixtures, the bench and study runs, are built once). Two workers on two cores: a
# multi-process test spends much of its wall time starting interpreters and waiting on its
# peers, so one worker leaves a core idle. PYTEST_WORKERS=0 runs in this process.
PYTEST_WORKERS ?= 2
test: $(STAMP) lint
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The in-process tier only: config checks, runner logic, codec, cadence (a few minutes).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not multiprocess" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache
