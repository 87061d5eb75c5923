"""The memory plan of a conversion: for each stack, the method that keeps the fewest bytes.

A stack of ``L`` momentum blocks trained with ``use_backprop=False`` saves memory one of two ways.
Per element of the stack's activation (``s`` bytes: its dtype's size), from its forward to its
backward, counting its output, which the next layer keeps for its own backward (a checkpointed
block keeps its input), they keep:

- memory-free: the final state. Float arithmetic keeps ``x_N``, which is the output, and ``v_N``:
  ``2 s``. Exact arithmetic keeps, beside the float output, ``x_N`` as a one-byte correction to
  it, ``v_N``'s integer word and the buffer of the bits that multiplying by gamma destroys
  (`inertia.ExactState`): ``4 + 1 + 4 + 1 = 10`` bytes for a float32 stack of up to 20 blocks at
  gamma 0.9 (float64 and 16-bit stacks keep ``x_N``'s word instead of the byte).
- checkpointing each block: each block's input, and the output: ``(L + 1) s``.

Both also hold, during the backward, one block's recomputation and a few gradients of the
activation's size, memory-free a few more beside its state (`inertia.testing.LiveTensorMeter`
counts them), which the plan leaves out; and memory-free's step is slower (its backward inverts
each block). So the plan runs a stack memory-free where it keeps at most four fifths of
checkpointing's bytes, and checkpoints it otherwise (`plan_stack`): an exact float32 stack of one
or two blocks is checkpointed (10 bytes memory-free against 12: ResNet-50's two-block stages
measured the same true peak either way, benchmarks/results/true_peak.md), and longer stacks run
memory-free. `transform_to_momentumnet` also checkpoints the kept first block of each stack,
which changes the shape (a checkpointed block keeps its input alone, less than any block that
keeps an activation), and a torchvision ResNet's stem, whose activations are the model's largest
(it keeps the image alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._core import kept_bytes_per_element
from .nn import METHODS

__all__ = ["Plan", "StackPlan", "plan_stack"]

# How `transform_to_momentumnet(method=...)` may choose: by the plan, or one method everywhere.
PLAN_METHODS = ("auto", *METHODS)


def check_method(method: str) -> None:
    """Refuse a ``method`` that is not one of `PLAN_METHODS`."""
    if method not in PLAN_METHODS:
        raise ValueError(
            f"method={method!r}; use 'auto' (each stack's plan), 'memory_free' or 'checkpoint'."
        )


@dataclass(frozen=True)
class StackPlan:
    """What one stack keeps for its backward, and the method chosen.

    Attributes:
        path: The stack's dotted path in the model.
        blocks: Its momentum blocks (after the kept ones).
        kept: Its leading blocks run as ordinary layers (``keep_first``).
        dtype: The dtype of its parameters, which its activation takes.
        gamma: The momentum.
        exact: Whether memory-free training uses exact arithmetic there.
        memory_free_bytes: Bytes per element of the activation that memory-free training keeps,
            the output counted (see the module's docstring).
        checkpoint_bytes: Bytes per element that checkpointing each block keeps, the output
            counted.
        method: ``"memory_free"``, ``"checkpoint"`` or ``"backprop"`` (``use_backprop=True``).
        reason: Why: ``"fewer bytes"``, ``"as many bytes, faster"``, ``"under a fifth fewer
            memory-free, faster"``, ``"gamma=0 cannot be inverted"``, ``"method='...'"``
            (forced) or ``"use_backprop=True"``.
        checkpoint_kept: Whether the kept blocks are checkpointed.
    """

    path: str
    blocks: int
    kept: int
    dtype: torch.dtype
    gamma: float
    exact: bool
    memory_free_bytes: int
    checkpoint_bytes: int
    method: str
    reason: str
    checkpoint_kept: bool


@dataclass(frozen=True)
class Plan:
    """A conversion's plan: one `StackPlan` per stack, and whether the stem is checkpointed (None:
    the model has no stem that inertia checkpoints, only a torchvision ResNet has). ``str(plan)``
    is a table of it; ``model.inertia_plan`` holds the plan of a converted model."""

    stacks: tuple[StackPlan, ...]
    checkpoint_stem: bool | None = None

    def __getitem__(self, path: str) -> StackPlan:
        for stack in self.stacks:
            if stack.path == path:
                return stack
        raise KeyError(f"no stack {path!r} in the plan; it has {[s.path for s in self.stacks]}.")

    def __str__(self) -> str:
        header = ("stack", "blocks", "dtype", "memory-free", "checkpoint", "method", "why")
        rows = [header]
        for s in self.stacks:
            arithmetic = "exact" if s.exact else "float"
            rows.append(
                (
                    s.path,
                    f"{s.kept}+{s.blocks}" if s.kept else str(s.blocks),
                    str(s.dtype).removeprefix("torch."),
                    f"{s.memory_free_bytes} B ({arithmetic})",
                    f"{s.checkpoint_bytes} B",
                    s.method,
                    s.reason,
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [
            "inertia plan: bytes kept from forward to backward per element of each stack's "
            "activation, its output counted (blocks: kept + momentum)"
        ]
        for row in rows:
            cells = (c.ljust(w) for c, w in zip(row, widths, strict=True))
            lines.append(("  " + "  ".join(cells)).rstrip())
        kept = [s.path for s in self.stacks if s.kept and s.checkpoint_kept]
        if kept:
            names = ", ".join(kept)
            lines.append(f"  kept blocks checkpointed (they keep their input only): {names}")
        if self.checkpoint_stem is not None:
            stem = "checkpointed (keeps the image only)" if self.checkpoint_stem else "kept"
            lines.append(f"  stem: {stem}")
        return "\n".join(lines)

    def __add__(self, other: Plan) -> Plan:
        stem = other.checkpoint_stem if other.checkpoint_stem is not None else self.checkpoint_stem
        return Plan(self.stacks + other.stacks, stem)


def plan_stack(
    path: str,
    blocks: int,
    *,
    kept: int = 0,
    dtype: torch.dtype = torch.float32,
    gamma: float = 0.9,
    exact: bool | None = None,
    method: str = "auto",
    checkpoint_kept: bool = True,
) -> StackPlan:
    """Plan how one stack of ``blocks`` momentum blocks (after ``kept`` ones) saves memory where
    ``use_backprop=False`` (`transform_to_momentumnet` notes ``"backprop"`` where it is True).

    ``method="auto"`` chooses memory-free where it keeps at most four fifths of the bytes that
    checkpointing each block keeps, and checkpointing otherwise (it is faster); ``"memory_free"``
    or ``"checkpoint"`` forces one. ``exact`` as in `MomentumNet` (None: exact when memory-free).

    Examples:
        >>> plan_stack("layer1", 2, kept=1).method  # 10 bytes memory-free, 12 checkpointed
        'checkpoint'
        >>> plan_stack("layer3", 22, kept=1).method
        'memory_free'
    """
    check_method(method)
    exact_memory_free = exact is not False
    size = dtype.itemsize
    if exact_memory_free and gamma > 0:
        memory_free = kept_bytes_per_element(gamma, blocks, dtype) + size  # and the float output
    else:
        memory_free = 2 * size  # x_N, the output, and v_N
    checkpoint = (blocks + 1) * size
    if method != "auto":
        chosen, reason = method, f"method={method!r}"
    elif gamma == 0:
        chosen, reason = "checkpoint", "gamma=0 cannot be inverted"
    elif 5 * memory_free <= 4 * checkpoint:
        chosen, reason = "memory_free", "fewer bytes"
    else:
        chosen = "checkpoint"
        if checkpoint < memory_free:
            reason = "fewer bytes"
        elif checkpoint == memory_free:
            reason = "as many bytes, faster"
        else:
            reason = "under a fifth fewer memory-free, faster"
    return StackPlan(
        path=path,
        blocks=blocks,
        kept=kept,
        dtype=dtype,
        gamma=gamma,
        exact=exact_memory_free,
        memory_free_bytes=memory_free,
        checkpoint_bytes=checkpoint,
        method=chosen,
        reason=reason,
        checkpoint_kept=checkpoint_kept,
    )
