# Two entry points for a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; set TORCH=torch to take whatever build pip picks for your machine.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt "$(TORCH)"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test,ray]"
	touch $@

demo: $(STAMP)
	$(BIN)/python scripts/make_demo.py demo
	$(BIN)/shardmerge run configs/demo.yaml

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts
	$(BIN)/lint-imports

# Tests in parallel on every core (at most 4): a file's module-scoped cluster stays in one worker.
test: lint
	$(BIN)/pytest -m "not slow" -n auto --maxprocesses 4 --dist loadgroup

clean:
	rm -rf demo build dist src/*.egg-info
