"""The true peak of a training step, measured as a user measures it, each case in a fresh process.

Bytes saved for backward (`inertia.testing.SavedTensorMeter`) leave out what a step allocates
beside them: parameter gradients, the backward's temporaries, the recomputation's own activations.
The true peak counts everything:

- on the CPU, the process's resident memory. Each case runs in a fresh ``python -m inertia.bench``
  launched with ``MALLOC_MMAP_THRESHOLD_=65536``, so that glibc returns freed tensors to the
  operating system. After the model is built and has run one warm-up step, the high-water mark of
  the resident set is reset by writing ``5`` to ``/proc/self/clear_refs``; the peak of the step is
  ``VmHWM`` read after it minus ``VmRSS`` read just before it (``/proc/self/status``). Where that is
  impossible (not Linux, no glibc, ``clear_refs`` not writable) peaks are nan, with the reason;
- on a GPU, ``torch.cuda.max_memory_allocated`` after the step minus ``memory_allocated`` before
  it, with ``reset_peak_memory_stats`` in between.

Allocations under 64 KiB still come from glibc's heap, which keeps what it frees: peaks of a
few hundred KiB (tiny models) are noise; the method is meant for steps of megabytes and more.

Each step is measured twice: with ``.grad`` unset (``zero_grad(set_to_none=True)``) and under
gradient accumulation (``.grad`` allocated, as after a first micro-batch). An optimizer step, when
asked for, is measured on its own. Times are taken in other processes (`time_variants`), never in
one whose memory is measured.
"""

from __future__ import annotations

import gc
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._steps import loss_of, sync

#: Set at the launch of each measuring process: glibc then serves allocations of 64 KiB and more
#: with ``mmap`` and returns them to the system when freed, so that the resident set follows the
#: tensors alive (and the dynamic threshold, which would keep freed memory, stays off).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


@dataclass(frozen=True)
class StepPeak:
    """One measured step (forward and backward, or an optimizer step).

    Args:
        peak_bytes: The most memory held during the step beyond what was held just before it;
            nan when it cannot be read (``reason`` says why).
        before_bytes: What was held just before the step: resident memory (``VmRSS``) on the CPU,
            allocated memory on a GPU; nan when unread.
        grad_bytes: Bytes of the ``.grad`` tensors allocated just before the step (0: unset).
        method: ``"rss"`` (``/proc/self`` resident set) or ``"cuda"`` (CUDA allocator).
        reason: Why the peak is nan; empty when it was read.

    Examples:
        >>> StepPeak(2.0**20, 2.0**30, 0, "rss").peak_bytes / 2**20
        1.0
    """

    peak_bytes: float
    before_bytes: float
    grad_bytes: int
    method: str
    reason: str = ""


def peak_method(device: torch.device) -> str:
    """How the peak is read on ``device``: ``"cuda"`` on a CUDA device, else ``"rss"``.

    Examples:
        >>> peak_method(torch.device("cpu"))
        'rss'
    """
    return "cuda" if device.type == "cuda" else "rss"


def rss_unavailable() -> str:
    """Why this process cannot measure a step's resident peak; empty when it can.

    Examples:
        >>> isinstance(rss_unavailable(), str)
        True
    """
    if sys.platform != "linux":
        return f"resident peaks need Linux's /proc/self/clear_refs; this is {sys.platform}"
    if platform.libc_ver()[0] != "glibc":
        return "resident peaks need glibc (MALLOC_MMAP_THRESHOLD_ returns freed tensors)"
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]:
        return (
            "MALLOC_MMAP_THRESHOLD_=65536 was not set when this process started, so freed "
            "tensors may stay resident; measure with inertia.bench.true_peak (a fresh process)"
        )
    try:
        _reset_high_water_mark()
        status = _status()
    except OSError as err:
        return f"cannot reset the resident high-water mark through {CLEAR_REFS}: {err}"
    if "VmHWM" not in status or "VmRSS" not in status:
        return f"{STATUS} has no VmHWM or VmRSS"
    return ""


def _reset_high_water_mark() -> None:
    with CLEAR_REFS.open("w") as fh:
        fh.write("5")


def _status() -> dict[str, int]:
    """VmHWM and VmRSS of this process, in bytes."""
    out = {}
    for line in STATUS.read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = 1024 * int(value.split()[0])  # reported in kB
    return out


def _grad_bytes(model: nn.Module) -> int:
    return sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)


def _measured(run: Callable[[], None], model: nn.Module, device: torch.device) -> StepPeak:
    """Run one step and read its peak beyond what was held just before it."""
    gc.collect()
    grads = _grad_bytes(model)
    method = peak_method(device)
    if method == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        sync(device)
        return StepPeak(torch.cuda.max_memory_allocated(device) - before, before, grads, method)
    reason = rss_unavailable()  # it resets the high-water mark when it can
    if reason:
        run()
        return StepPeak(float("nan"), float("nan"), grads, method, reason)
    before = _status()["VmRSS"]
    run()
    return StepPeak(_status()["VmHWM"] - before, before, grads, method)


def measure_step_peaks(
    model: nn.Module,
    inputs: tuple[Any, ...],
    *,
    optimizer: str | None = None,
    warm_up: bool = True,
    loss: Callable[[Any], Tensor] = loss_of,
) -> tuple[StepPeak, StepPeak, StepPeak | None]:
    """The true peaks of a training step of ``model`` in this process (what `true_peak` runs).

    One warm-up step (with the optimizer's step, which creates its state), then a step with
    ``.grad`` unset, then, when ``optimizer`` is given, its step, then a step under gradient
    accumulation (``.grad`` allocated by the step before). On the CPU the process must have been
    started with ``MALLOC_MMAP_THRESHOLD_=65536`` (`MALLOC_ENV`), else the peaks are nan with the
    reason: prefer `true_peak`, which starts a fresh process.

    Args:
        model: The model, in train mode, on its device.
        inputs: Positional inputs of one forward.
        optimizer: ``"sgd"`` (momentum 0.9) or ``"adam"``: measure its step too.
        warm_up: Run the warm-up step (False: the caller has run one).
        loss: Maps the output to the scalar loss.

    Returns:
        (``.grad`` unset, gradient accumulation, the optimizer's step or None).

    Examples:
        >>> unset, accumulated, _ = measure_step_peaks(nn.Linear(8, 8), (torch.randn(4, 8),))
        >>> unset.grad_bytes, accumulated.grad_bytes
        (0, 288)
    """
    device = next(model.parameters()).device
    opt = _optimizer(optimizer, model)

    def step() -> None:
        loss(model(*inputs)).backward()  # type: ignore[no-untyped-call]

    if warm_up:
        step()
    if opt is not None:
        opt.step()
    model.zero_grad(set_to_none=True)
    unset = _measured(step, model, device)
    opt_step = None if opt is None else _measured(opt.step, model, device)
    accumulated = _measured(step, model, device)
    return unset, accumulated, opt_step


def _optimizer(name: str | None, model: nn.Module) -> torch.optim.Optimizer | None:
    if name is None:
        return None
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-6)
    raise ValueError(f"unknown optimizer {name!r}: sgd or adam")
