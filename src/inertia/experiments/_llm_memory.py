"""The memory side of the LLM experiment's gamma sweep: the exact buffer's bits, the decoder
stack's saved bytes and the true peak of a training step, at each gamma and for HuggingFace's
checkpointing (keyed by gamma 0, the original)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._errors import InertiaError
from ..nn import MomentumNet

if TYPE_CHECKING:
    from ..bench import TruePeak

__all__ = ["TINY_WIDTH", "buffer_bits", "momentum_stack", "stack_bytes", "true_peaks"]

TINY_WIDTH = 64  # llama-tiny's hidden size


def momentum_stack(model: Any) -> MomentumNet:
    """The converted decoder stack of ``model`` (inside peft's wrapper too), checked to be what
    the experiment measures: memory-free, in exact arithmetic."""
    stacks = [m for m in model.modules() if isinstance(m, MomentumNet)]
    if len(stacks) != 1 or stacks[0].method != "memory_free" or not stacks[0].exact:
        found = ", ".join(f"{s.method} (exact {s.exact})" for s in stacks) or "none"
        raise InertiaError(
            f"the converted model should hold one memory-free exact stack; found {found}"
        )
    return stacks[0]


def buffer_bits(model: Any, ids: Tensor) -> tuple[int, int]:
    """``(used, stored)``: bits per element of the exact buffer after the converted stack's last
    layer, read from the fixed-point state of a forward on ``ids``.

    The model runs once in eval mode without autograd while a hook keeps what its stack receives;
    the stack runs again on that with ``return_state=True``, which returns its `ExactState`.
    ``used``: the bit length of the buffer's largest element plus the bits of its word planes
    (the older bits moved out of it, 32 per element each); ``stored``: the width of the buffer's
    dtype plus the planes' (`ExactState.buffer_bits_per_element`). The memory-free backward keeps
    the buffer in the smallest dtype that its bound allows, so where planes were pushed it may
    keep fewer bits than ``stored``; the stack's saved bytes (`stack_bytes`) count what it keeps.
    """
    stack = momentum_stack(model)
    seen: dict[str, Any] = {}

    def keep(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.update(args=args, kwargs=kwargs)

    handle = stack.register_forward_pre_hook(keep, with_kwargs=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(ids)
            x, *args = seen["args"]
            # MomentumLayerList's forward (its parent's loop) has no return_state; its base's has.
            state = MomentumNet.forward(stack, x, *args, return_state=True, **seen["kwargs"])
    finally:
        handle.remove()
        model.train(was_training)
    planes = sum(8 * w.element_size() for w in state.words)
    return int(state.buffer.max()).bit_length() + planes, state.buffer_bits_per_element


def stack_bytes(model: str, layers: int, seq: int, gamma: float) -> tuple[int, int]:
    """``(bytes, elements)``: what the decoder stack saves for backward and still holds after the
    model's forward (`inertia.bench.stack_saved_bytes`, batch 1, ``seq`` tokens, every weight
    trainable), converted at ``gamma`` (the ``default`` variant), or with HuggingFace's
    checkpointing at gamma 0; and the elements of the stack's activation (tokens times width)."""
    from ..bench import PeakCase, stack_saved_bytes
    from ..bench._steps import build

    case = PeakCase(model, depth=layers, width=TINY_WIDTH, batch=1, seq_len=seq, gamma=gamma or 0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF's checkpointing says that it turns the cache off
        built, inputs = build(case, "checkpoint" if gamma == 0 else "default", torch.device("cpu"),
                              for_memory=True)  # fmt: skip
    if gamma:
        momentum_stack(built)
    stack = case.stack_of(built)
    assert stack is not None
    held = stack_saved_bytes(built, inputs, stack)
    config: Any = built.config
    return held, seq * int(config.hidden_size)


def true_peaks(
    model: str, layers: int, seq: int, gammas: Sequence[float], threads: int | None
) -> dict[str, dict[float, TruePeak]]:
    """``{"full" | "LoRA": {gamma: TruePeak}}``: the true peak of a training step on the causal
    LM's own loss (`inertia.bench.true_peak`, a fresh process each), batch 1, ``seq`` tokens,
    converted at each gamma (the ``default`` variant) and with HuggingFace's checkpointing (gamma
    0), every weight trained or LoRA's adapters."""
    from .. import bench

    found: dict[str, dict[float, TruePeak]] = {}
    for lora in (False, True):
        runs = found.setdefault("LoRA" if lora else "full", {})
        for gamma in (0.0, *gammas):
            case = bench.PeakCase(model, depth=layers, width=TINY_WIDTH, batch=1, seq_len=seq,
                                  gamma=gamma or 0.9, lora=lora, labels=True)  # fmt: skip
            runs[gamma] = bench.true_peak(
                case, "checkpoint" if gamma == 0 else "default", threads=threads
            )
    return found
