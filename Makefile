# The two commands a new user runs: `make demo` and `make test`.
# Both create .venv when it is missing and (re)install the package when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.inertia-installed

.PHONY: demo test lint typecheck unit bench experiments clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

# Trains the default momentum ResNet memory-free on the embedded digits, benchmarks memory and
# time against depth, and plots both. The training uses float arithmetic (--float): its stages hold
# one momentum block each, where exact mode's integers outweigh what memory-free saves (README).
demo: $(STAMP)
	$(PY) -m inertia train --epochs 5 --float --checkpoint-kept --checkpoint-stem --out runs/demo
	$(PY) -m inertia bench --quick --out runs/bench
	$(PY) -m inertia plot runs/demo

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: $(STAMP)
	$(PY) -m mypy

unit: $(STAMP)
	$(PY) -m pytest --durations=15

test: lint typecheck unit

bench: $(STAMP)
	$(PY) benchmarks/memory_vs_depth.py

# The paper's experiments at CPU scale (about 7 minutes): figures and tables in docs/experiments/.
EXPERIMENTS := crossing rings linear-maps optimize gamma memory ode-limit
experiments: $(STAMP)
	for name in $(EXPERIMENTS); do $(PY) -m inertia experiment $$name --out docs/experiments || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
