"""The paper's experiments at small scale: ``inertia experiment NAME`` writes a figure and a table.

Each experiment compares arms that differ only in gamma (same architecture, initial weights, data,
steps and optimizer), checks the paper's claim on every seed with a stated margin, and returns an
`ExperimentResult`; `write_results` turns it into ``NAME.png``, ``NAME.csv`` and ``NAME.md``.
Figures need matplotlib (``pip install 'inertia[plot]'``); ``ode-limit`` needs torchdiffeq
(``pip install 'inertia[science]'``).

Examples:
    >>> from inertia.experiments import list_experiments
    >>> list_experiments()[:2]
    ['crossing', 'rings']
"""

from __future__ import annotations

import time

from . import flows, gamma, linear_maps, llm, memory, ode_limit, optimize  # noqa: F401 (registers)
from ._core import (
    EXPERIMENTS,
    Experiment,
    ExperimentConfig,
    ExperimentResult,
    threads,
    write_results,
)

for _name in sorted(EXPERIMENTS, key=lambda n: EXPERIMENTS[n].title):  # "1. ..." to "7. ..."
    EXPERIMENTS[_name] = EXPERIMENTS.pop(_name)

__all__ = [
    "EXPERIMENTS",
    "Experiment",
    "ExperimentConfig",
    "ExperimentResult",
    "list_experiments",
    "run_experiment",
    "write_results",
]


def list_experiments() -> list[str]:
    """Names of the registered experiments, in the paper's order."""
    return list(EXPERIMENTS)


def run_experiment(name: str, config: ExperimentConfig | None = None) -> ExperimentResult:
    """Run the experiment ``name`` and return its result (timed, threads set by ``config``).

    Raises:
        ValueError: Unknown ``name``, no seed, or a part (``config.parts``) that the experiment
            does not have.
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    config = config or ExperimentConfig()
    EXPERIMENTS[name].check_parts(config.parts)
    if not config.seeds:
        raise ValueError("an experiment needs at least one seed")
    start = time.perf_counter()
    with threads(config.threads):
        result = EXPERIMENTS[name].run(config)
    result.seconds = time.perf_counter() - start
    return result
