"""torch.compile'd blocks inside a memory-free stack: same gradients as compiled backprop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from conftest import MLP
from inertia import MomentumNet
from inertia.testing import assert_gradients_match


def test_compiled_blocks_with_dropout() -> None:
    """Dropout in compiled blocks draws from inductor's generator, which is seeded from torch's
    default generator: the per-block replay covers it, in train mode."""
    torch._dynamo.reset()
    counters.clear()
    base = MomentumNet([MLP(8, 16, dropout=0.1) for _ in range(4)], 0.9).double().train()
    backprop, free = copy.deepcopy(base), copy.deepcopy(base)
    free.use_backprop = False
    for model in (backprop, free):
        for block in model:
            block.compile()
    x = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)
    assert_gradients_match(backprop, free, x, seed=1)
    assert counters["stats"]["unique_graphs"] >= 1  # compiled frames really ran
    assert counters["stats"]["calls_captured"] >= 8


# Dynamo itself reads .grad of a non-leaf tensor while it traces the stack's input checks.
@pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf Tensor is being accessed"
)
def test_compiling_a_whole_model() -> None:
    """torch.compile on a model holding a memory-free stack: same gradients as eager. Dynamo
    breaks the graph around the stack (its generator bookkeeping and inversion sketch cannot be
    traced) and compiles the rest: documented, and counted here."""
    torch._dynamo.reset()
    counters.clear()
    blocks = [MLP(8, 16) for _ in range(4)]
    model = nn.Sequential(
        nn.Linear(8, 8), MomentumNet(blocks, 0.9, use_backprop=False), nn.Linear(8, 2)
    ).double()
    compiled = copy.deepcopy(model)
    compiled.compile()
    x = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)
    assert_gradients_match(model, compiled, x)
    assert counters["stats"]["unique_graphs"] >= 2  # the layers around the stack were compiled
    assert sum(counters["graph_break"].values()) > 0
