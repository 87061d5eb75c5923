"""Find the stacks of same-shape blocks in a model by running it once on example inputs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["find_residual_stacks"]


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    return None


def _call(model: nn.Module, example_inputs: Any) -> None:
    if isinstance(example_inputs, Mapping):
        model(**example_inputs)
    elif isinstance(example_inputs, tuple):
        model(*example_inputs)
    else:
        model(example_inputs)


def find_residual_stacks(
    model: nn.Module, example_inputs: Any, keep_first_layer: bool = True
) -> list[str]:
    """Dotted paths of the stacks of blocks that keep their input's shape, outermost first.

    Runs ``model`` once (in eval mode, without gradients; modes are restored) on
    ``example_inputs`` (a tensor, a tuple of positional arguments or a dict of keyword arguments)
    and records every ``nn.Sequential`` or ``nn.ModuleList`` of at least two blocks (modules with
    parameters and submodules) that were each called once, in order, each on the previous one's
    output, and that keep the shape of their input (all but the first with ``keep_first_layer``).
    Stacks nested inside a stack that was found are skipped.

    Examples:
        >>> from torchvision.models import resnet18
        >>> find_residual_stacks(resnet18(), torch.randn(1, 3, 32, 32))
        ['layer1', 'layer2', 'layer3', 'layer4']
    """
    candidates = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Sequential, nn.ModuleList)) and len(module) >= 2
    }
    calls: dict[str, list[tuple[int, Tensor | None, Tensor | None]]] = {n: [] for n in candidates}
    handles = []
    for name, stack in candidates.items():
        for index, block in enumerate(stack):

            def hook(
                _: nn.Module, args: tuple[Any, ...], out: Any, name: str = name, index: int = index
            ) -> None:
                calls[name].append((index, _first_tensor(args), _first_tensor(out)))

            handles.append(block.register_forward_hook(hook))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            _call(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training

    found: list[str] = []
    for name, stack in candidates.items():  # named_modules order: parents before children
        if any(name.startswith(f"{outer}.") or outer == "" for outer in found):
            continue
        if _is_stack(stack, calls[name], keep_first_layer):
            found.append(name)
    return found


def _is_stack(
    stack: nn.Module,
    calls: list[tuple[int, Tensor | None, Tensor | None]],
    keep_first_layer: bool,
) -> bool:
    blocks = list(stack.children())
    if len(calls) != len(blocks) or [c[0] for c in calls] != list(range(len(blocks))):
        return False  # not each block once, in order
    if not all(
        any(True for _ in b.children()) and any(True for _ in b.parameters()) for b in blocks
    ):
        return False  # leaf layers (a Linear, a LayerNorm) are not residual blocks
    previous: Tensor | None = None
    for index, inp, out in calls:
        if inp is None or out is None:
            return False
        if index > 0 and inp is not previous:
            return False  # the parent transforms the hidden state between blocks
        if (index > 0 or not keep_first_layer) and out.shape != inp.shape:
            return False
        previous = out
    return True
