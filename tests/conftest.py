"""Blocks and reference implementations shared by the tests."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from inertia import MomentumNet
from inertia.testing import backprop_twin

DTYPES = [torch.float32, torch.float64]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each test process takes its share of the cores for torch's threads,
    so that the processes do not oversubscribe them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        affinity = getattr(os, "sched_getaffinity", None)  # Linux
        cores = len(affinity(0)) if affinity is not None else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // workers))


class MLP(nn.Module):
    """Linear - [BatchNorm] - Tanh - [Dropout] - Linear: a block that keeps the shape."""

    def __init__(self, d: int = 8, h: int = 16, dropout: float = 0.0, bn: bool = False) -> None:
        super().__init__()
        # As in conv-BN stacks, no bias before BatchNorm: its gradient would be zero up to rounding.
        layers: list[nn.Module] = [nn.Linear(d, h, bias=not bn)]
        if bn:
            layers.append(nn.BatchNorm1d(h))
        layers.append(nn.Tanh())
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(h, d))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ArgBlock(nn.Module):
    """A block with extra positional and keyword arguments, tensors and not."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.mlp = MLP(d)

    def forward(
        self, x: Tensor, scale: Tensor, *, shift: Tensor | None = None, power: int = 1
    ) -> Tensor:
        out = self.mlp(x) * scale**power
        return out if shift is None else out + shift


class LoopNet(nn.Module):
    """The momentum loop written out by hand: the reference for the library's two modes."""

    def __init__(self, net: MomentumNet) -> None:
        super().__init__()
        for i, block in enumerate(net):
            self.add_module(str(i), block)
        if net.init_function is not None:
            self.add_module("init", net.init_function)
        self.depth, self.gamma = len(net), net.gamma
        self.init_speed, self.is_residual = net.init_speed, net.is_residual

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        v = self._modules["init"](x) if self.init_speed else torch.zeros_like(x)  # type: ignore[misc]
        for i in range(self.depth):
            f = self._modules[str(i)](x, *args, **kwargs)  # type: ignore[misc]
            if not self.is_residual:
                f = f - x
            v = self.gamma * v + (1 - self.gamma) * f
            x = x + v
        return x


def twins(net: MomentumNet) -> tuple[MomentumNet, MomentumNet, LoopNet]:
    """Independent copies: (backprop twin, memory-free, hand-written loop), same weights. The twin
    has the memory-free copy's arithmetic (exact unless ``net`` pins ``exact=False``)."""
    free = copy.deepcopy(net)
    free.use_backprop = False
    backprop = backprop_twin(free)
    assert isinstance(backprop, MomentumNet)
    return backprop, free, LoopNet(copy.deepcopy(net))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
