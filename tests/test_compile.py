"""torch.compile'd blocks inside a memory-free stack: same gradients as compiled backprop."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch._dynamo.utils import counters
from torch._inductor.compile_fx import compile_fx

from conftest import MLP
from inertia import MomentumNet, transform_to_momentumnet
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


class Around(nn.Module):
    """A stack between two layers, called directly (as torchvision's ResNet calls its stages)."""

    def __init__(self, exact: bool) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.stack = MomentumNet(
            [MLP(8, 16) for _ in range(4)], 0.9, use_backprop=False, exact=exact
        )
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stack(self.stem(x)).cos())  # type: ignore[no-any-return]


@pytest.mark.parametrize("exact", [False, True])
def test_compiling_a_whole_model(exact: bool) -> None:
    """torch.compile on a model holding a memory-free stack: the same gradients as eager. The
    stack is one graph break (dynamo cannot trace its generator bookkeeping and inversion sketch,
    and must not compile its blocks in the forward only: exact mode's recomputation would then
    differ, which raised InversionError); the layers around it are compiled, as the graphs that
    inductor received show."""
    torch._dynamo.reset()
    graphs: list[set[str]] = []

    def recording(gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Any:
        graphs.append({str(node.target) for node in gm.graph.nodes if node.op.startswith("call_")})
        return compile_fx(gm, example_inputs)

    model = Around(exact).double()
    compiled = copy.deepcopy(model)
    compiled.compile(backend=recording)
    x = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)
    assert_gradients_match(model, compiled, x)
    ops = [op for graph in graphs for op in graph]
    assert sum("linear" in op for op in ops) == 2  # the stem and the head, not the blocks
    assert any("cos" in op for op in ops)


def test_compiling_a_converted_resnet() -> None:
    """A converted torchvision ResNet-18 compiled whole: its stem, the first block of each stage
    (which changes shape, so it is kept) and its head are compiled, and the memory-free stages run
    as they are. Graphs are recorded and run as captured (no inductor: this checks what dynamo
    captures, quickly), and the gradients equal eager's."""
    tvm = pytest.importorskip("torchvision.models")
    torch._dynamo.reset()
    convs: list[int] = []

    def recording(gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Any:
        calls = [str(node.target) for node in gm.graph.nodes if node.op == "call_function"]
        convs.append(sum("conv" in target for target in calls))
        return gm.forward

    torch.manual_seed(0)
    model = transform_to_momentumnet(
        tvm.resnet18(num_classes=10),
        gamma=0.9,
        method="memory_free",
        checkpoint_kept=False,
        checkpoint_stem=False,
    )
    model = model.double()
    compiled = copy.deepcopy(model)
    compiled.compile(backend=recording)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    assert_gradients_match(model, compiled, x)
    assert sum(convs) == 1 + 2 + 3 * 3  # stem; layer1's first block; layers 2-4's, downsampling
