"""Fresh processes: `true_peak` measures one case and variant in its own ``python -m inertia.bench``
(launched with `MALLOC_ENV`), `time_variants` times the variants of a case side by side in another
(launched without it, as users run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._errors import InertiaError
from ._peak import MALLOC_ENV, StepPeak, measure_step_peaks
from ._steps import PeakCase, build, saved_bytes, stack_saved_bytes, step_times

_MARK = "inertia-bench-child: "


@dataclass(frozen=True)
class TruePeak:
    """What `true_peak` measured for one case and variant in a fresh process.

    Args:
        case: The case's label.
        variant: The variant.
        device: Where it ran.
        grad_unset: The training step with ``.grad`` unset.
        grad_accumulated: The same step with ``.grad`` allocated (gradient accumulation).
        optimizer_step: The optimizer's step alone, when one was measured.
        saved_bytes: Peak bytes saved for backward over the warm-up step (parameters excluded;
            reentrant checkpointing stands in for non-reentrant, whose inputs hooks cannot see).
        parameter_bytes: Bytes of the parameters.
        stack_saved_bytes: Bytes the case's stack (`PeakCase.stack_of`) saves for backward and
            still holds after the forward (`stack_saved_bytes`); None for cases without one.
        logits_bytes: Bytes of the float32 logits that the loss computes at once
            (`PeakCase.logits_bytes`); 0 for models without logits.
        warnings: The warnings the process raised (an ``InversionWarning``, say), once each.

    Examples:
        >>> step = StepPeak(2.0**20, 2.0**30, 0, "rss")
        >>> TruePeak("mlp", "plain", "cpu", step, step, None, 0, 0).grad_unset.method
        'rss'
    """

    case: str
    variant: str
    device: str
    grad_unset: StepPeak
    grad_accumulated: StepPeak
    optimizer_step: StepPeak | None
    saved_bytes: int
    parameter_bytes: int
    stack_saved_bytes: int | None = None
    logits_bytes: int = 0
    warnings: tuple[str, ...] = field(default=())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TruePeak:
        """The inverse of ``dataclasses.asdict``."""
        opt = d["optimizer_step"]
        return cls(**{
            **d,
            "grad_unset": StepPeak(**d["grad_unset"]),
            "grad_accumulated": StepPeak(**d["grad_accumulated"]),
            "optimizer_step": None if opt is None else StepPeak(**opt),
            "warnings": tuple(d["warnings"]),
        })  # fmt: skip


def _measure_case(
    case: PeakCase, variant: str, device: torch.device, optimizer: str | None
) -> TruePeak:
    """A fresh process's work: build, count saved bytes over the warm-up step, measure."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, inputs = build(case, variant, device)
        counted, leaves = model, inputs
        if variant == "checkpoint":
            # Reentrant checkpointing differentiates a block only when its input requires grad.
            counted, x = build(case, variant, device, for_memory=True)
            leaves = tuple(t.requires_grad_(t.is_floating_point()) for t in x)  # not token ids
        blocks = case.stack_of(counted)
        stack = None if blocks is None else stack_saved_bytes(counted, leaves, blocks)
        # For the other variants, the step whose saved bytes are counted warms the model up.
        saved = saved_bytes(counted, leaves)[1]
        del counted, leaves
        unset, accumulated, opt_step = measure_step_peaks(
            model, inputs, optimizer=optimizer, warm_up=variant == "checkpoint"
        )
    return TruePeak(
        case=case.label(),
        variant=variant,
        device=str(device),
        grad_unset=unset,
        grad_accumulated=accumulated,
        optimizer_step=opt_step,
        saved_bytes=saved,
        parameter_bytes=sum(p.nbytes for p in model.parameters()),
        stack_saved_bytes=stack,
        logits_bytes=case.logits_bytes(variant, _vocab(model)),
        warnings=tuple(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught)),
    )


def _vocab(model: nn.Module) -> int:
    """The vocabulary of a HuggingFace model inside ``model`` (0: none)."""
    sizes = (getattr(getattr(m, "config", None), "vocab_size", None) for m in model.modules())
    return next((v for v in sizes if isinstance(v, int)), 0)


def _child(argv: Sequence[str]) -> int:
    """``python -m inertia.bench memory|time JSON``: one job; its result is one JSON line."""
    if len(argv) != 2 or argv[0] not in ("memory", "time"):
        print("usage: python -m inertia.bench memory|time JSON (started by inertia.bench)")
        return 2
    job = json.loads(argv[1])
    if job["threads"] is not None:
        torch.set_num_threads(job["threads"])
    case, device = PeakCase(**job["case"]), torch.device(job["device"])
    if argv[0] == "memory":
        result: Any = asdict(_measure_case(case, job["variant"], device, job["optimizer"]))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the memory processes report them
            built = {v: build(case, v, device) for v in job["variants"]}
            inputs = next(iter(built.values()))[1]  # the same in every build (same seed)
            models = {v: model for v, (model, _) in built.items()}
            result = step_times(models, inputs, job["repeats"], device)
    print(_MARK + json.dumps(result), flush=True)
    return 0


def _run_child(mode: str, job: dict[str, Any], timeout: float | None) -> Any:
    """Run one job in a fresh interpreter; its JSON result. Memory is measured in a process
    launched with `MALLOC_ENV`; times in one without (a fresh ``mmap`` for every tensor would
    slow the steps down), as users run."""
    root = str(Path(__file__).resolve().parents[2])  # the same inertia as this process's
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    env.update(MALLOC_ENV if mode == "memory" else {}, PYTHONPATH=path)
    command = [sys.executable, "-m", "inertia.bench", mode, json.dumps(job)]
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise InertiaError(f"the measuring process ran past {timeout} s: {job}") from err
    lines = [x for x in done.stdout.splitlines() if x.startswith(_MARK)]
    if done.returncode != 0 or not lines:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise InertiaError(f"the measuring process failed ({done.returncode}) on {job}:\n{tail}")
    return json.loads(lines[-1].removeprefix(_MARK))


def true_peak(
    case: PeakCase,
    variant: str,
    *,
    device: str = "cpu",
    optimizer: str | None = None,
    threads: int | None = 2,
    timeout: float | None = None,
) -> TruePeak:
    """The true peak of one training step of ``case`` as ``variant``, in a fresh process.

    The one measurement of a step's memory in inertia: the benchmark, ``inertia bench
    --true-peak`` and the memory experiment call it. The process builds the model, runs a
    warm-up step (counting bytes saved for backward as it goes), then measures a step with
    ``.grad`` unset and one under gradient accumulation, and an optimizer's step when asked
    (`measure_step_peaks`). On the CPU, peaks are nan where the resident high-water mark cannot be
    reset; ``grad_unset.reason`` says why.

    Args:
        case: The model and its sizes.
        variant: ``plain``, ``checkpoint``, ``momentum_backprop``, ``momentum_free`` or
            ``momentum_exact`` (and the paper's ``momentumnet_0.10`` for the mlp).
        device: ``"cpu"`` or a CUDA device.
        optimizer: ``"sgd"`` or ``"adam"`` to measure its step as well.
        threads: ``torch.set_num_threads`` in the process; None leaves torch's default.
        timeout: Seconds before the process is given up (an `InertiaError`).

    Returns:
        What was measured.

    Raises:
        InertiaError: The process failed (its error output is quoted) or timed out.

    Examples:
        >>> result = true_peak(PeakCase("mlp", depth=2, batch=4, width=8), "momentum_free")
        >>> result.grad_unset.grad_bytes, result.grad_accumulated.grad_bytes
        (0, 1152)
    """
    job = {
        "case": asdict(case),
        "variant": variant,
        "device": device,
        "optimizer": optimizer,
        "threads": threads,
    }
    return TruePeak.from_dict(_run_child("memory", job, timeout))


def time_variants(
    case: PeakCase,
    variants: Sequence[str],
    repeats: int,
    *,
    device: str = "cpu",
    threads: int | None = 2,
    timeout: float | None = None,
) -> dict[str, list[float]]:
    """Step times in ms of ``variants`` of ``case``, side by side in one fresh process.

    Every variant is built, then they run in ``repeats`` interleaved rounds after a round that
    warms up (`.grad` unset before each step), so that a noisy machine's drift touches all alike.
    No memory is measured in that process.

    Examples:
        >>> times = time_variants(PeakCase("mlp", depth=2, batch=4, width=8), ["plain"], 2)
        >>> len(times["plain"])
        2
    """
    job = {
        "case": asdict(case),
        "variants": list(variants),
        "repeats": repeats,
        "device": device,
        "threads": threads,
    }
    result: dict[str, list[float]] = _run_child("time", job, timeout)
    return result
