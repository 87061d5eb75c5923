"""The per-stack plan of `transform_to_momentumnet`: memory-free where it keeps at most four fifths
of the bytes that checkpointing each block keeps, checkpointing otherwise, with the same gradients,
statistics and randomness."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor, nn
from torchvision import models as tvm

from inertia import InertiaError, MomentumNet, Plan, plan_stack, transform_to_momentumnet
from inertia.models.resnet import CheckpointedStemResNet
from inertia.testing import LiveTensorMeter, assert_gradients_match, backprop_twin


def test_the_plan_counts_bytes_per_stack() -> None:
    """ResNet-101's stages hold 2, 3, 22 and 2 momentum blocks. Counting the output, which the
    next layer keeps: in exact arithmetic a float32 stack keeps, memory-free, the float output,
    x_N's one-byte correction to it, v_N's int32 word and a one-byte buffer (two past 20 blocks
    at gamma 0.9), against 4 bytes per block and the output checkpointed; float arithmetic keeps
    x_N (the output) and v_N. Memory-free where it keeps at most four fifths of checkpointing's
    bytes."""
    exact = [plan_stack(f"s{n}", n) for n in (2, 3, 22)]
    assert [(p.memory_free_bytes, p.checkpoint_bytes, p.method) for p in exact] == [
        (10, 12, "checkpoint"),
        (10, 16, "memory_free"),
        (11, 92, "memory_free"),
    ]
    assert exact[0].reason == "under a fifth fewer memory-free, faster"
    floats = [plan_stack("s", n, exact=False) for n in (1, 2)]
    assert [p.method for p in floats] == ["checkpoint", "memory_free"]
    assert floats[0].reason == "as many bytes, faster"
    # bf16 activations: 2 bytes per block checkpointed, against int32 words memory-free (x_N's
    # too: no one-byte correction to a 16-bit float), 11 bytes.
    assert plan_stack("s", 4, dtype=torch.bfloat16).reason == "fewer bytes"  # 10 checkpointed
    assert plan_stack("s", 5, dtype=torch.bfloat16).method == "checkpoint"  # 12
    assert plan_stack("s", 6, dtype=torch.bfloat16).method == "memory_free"  # 14
    # float64 stacks keep int64 words: 25 bytes against 8 per block and the output.
    assert plan_stack("s", 2, dtype=torch.float64).method == "checkpoint"
    assert plan_stack("s", 3, dtype=torch.float64).method == "memory_free"
    # A small gamma fills the buffer faster: 24 bytes of integers after 30 blocks at gamma 0.1,
    # whose word planes keep x_N in its word.
    assert plan_stack("s", 30, gamma=0.1).memory_free_bytes == 24 + 4
    assert plan_stack("s", 2, gamma=0.0).reason == "gamma=0 cannot be inverted"
    assert plan_stack("s", 22, method="checkpoint").method == "checkpoint"
    assert plan_stack("s", 2, method="memory_free").method == "memory_free"
    with pytest.raises(ValueError, match="method='fast'; use 'auto'"):
        plan_stack("s", 2, method="fast")


def test_resnet101_plan_is_logged_and_readable(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="inertia"):
        model = transform_to_momentumnet(tvm.resnet101(), gamma=0.9)
    plan = model.inertia_plan
    assert isinstance(plan, Plan)
    assert [s.method for s in plan.stacks] == [
        "checkpoint",
        "memory_free",
        "memory_free",
        "checkpoint",
    ]
    assert [model.get_submodule(s.path).method for s in plan.stacks] == [
        s.method for s in plan.stacks
    ]
    assert plan.checkpoint_stem
    assert type(model) is CheckpointedStemResNet
    assert all(model.get_submodule(s).checkpoint_kept for s in ("layer1", "layer4"))
    text = str(plan)
    assert "layer3  1+22    float32  11 B (exact)" in text
    assert "stem: checkpointed" in text
    assert text in caplog.text
    with pytest.raises(KeyError, match="no stack 'layer5'"):
        plan["layer5"]


def test_use_backprop_and_forced_methods() -> None:
    backprop = transform_to_momentumnet(tvm.resnet18(), use_backprop=True)
    assert {s.method for s in backprop.inertia_plan.stacks} == {"backprop"}
    assert type(backprop) is tvm.ResNet
    assert not backprop.layer1.checkpoint_kept
    forced = transform_to_momentumnet(tvm.resnet18(), method="memory_free")
    assert {forced.get_submodule(s.path).method for s in forced.inertia_plan.stacks} == {
        "memory_free"
    }
    with pytest.raises(ValueError, match="method='auto!'; use 'auto'"):
        transform_to_momentumnet(tvm.resnet18(), method="auto!")
    net = MomentumNet([nn.Linear(3, 3)], gamma=0.9, use_backprop=False)
    with pytest.raises(ValueError, match="method='x'; use 'memory_free'"):
        net.method = "x"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_default_plan_gradients_match_backprop(dtype: torch.dtype) -> None:
    """ResNet-50 as converted by default mixes every method: stem, kept blocks, layer1 and layer4
    checkpointed, layer2 and layer3 memory-free (exact): gradients of every parameter and of the
    input, outputs and BatchNorm buffers match its backprop twin's over two steps (the same
    arithmetic, stack by stack)."""
    model = tvm.resnet50(num_classes=10).to(dtype).train()
    default = transform_to_momentumnet(model, gamma=0.9)
    assert [s.method for s in default.inertia_plan.stacks] == [
        "checkpoint",
        "memory_free",
        "memory_free",
        "checkpoint",
    ]
    x = torch.randn(4, 3, 32, 32, dtype=dtype, requires_grad=True)
    errors = assert_gradients_match(backprop_twin(default), default, x, steps=2)
    for name in ("bn1", "layer1.1.bn1", "layer4.2.bn3", "layer1.0.bn1"):
        assert errors[f"buffer.{name}.num_batches_tracked"] == 0.0  # updated once per step


class Noisy(nn.Module):
    """A block that draws noise from a generator of its own (``generator=``), which
    ``torch.utils.checkpoint`` alone does not replay."""

    def __init__(self, width: int, generator: torch.Generator) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.generator = generator

    def forward(self, x: Tensor) -> Tensor:
        noise = torch.rand(x.shape, generator=self.generator, dtype=x.dtype)
        return torch.tanh(self.linear(x)) * (noise > 0.3)


def test_checkpointed_blocks_replay_their_own_generators() -> None:
    """Checkpointed momentum blocks and checkpointed kept blocks draw, in their recomputation,
    the random numbers of their forward; without the replay the gradients would be those of
    another mask."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    blocks = [Noisy(8, generator) for _ in range(3)]
    net = MomentumNet(blocks, 0.9, use_backprop=False, method="checkpoint", keep_first=1)
    net.checkpoint_kept = True
    net.double()
    twin = backprop_twin(net)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    grads = []
    for model in (twin, net):
        generator.manual_seed(1)
        model.zero_grad()
        x.grad = None
        model(x).square().sum().backward()
        grads.append([x.grad, *(p.grad for p in model.parameters())])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_checkpointed_stack_keeps_each_block_input() -> None:
    """Forced to checkpoint, a stack's step holds one block input more per block (and one block's
    recomputation); plain backprop holds every block's activations (nine inputs' worth here)."""
    width = 64
    x = torch.randn(512, width)
    state = x.numel() * 4
    peaks: dict[tuple[bool, int], int] = {}
    for depth in (4, 8):
        for checkpointed in (True, False):
            torch.manual_seed(0)
            blocks = [
                nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
                for _ in range(depth)
            ]
            if checkpointed:
                net = MomentumNet(blocks, 0.9, use_backprop=False, method="checkpoint")
            else:
                net = MomentumNet(blocks, 0.9, use_backprop=True)
            for p in net.parameters():
                p.grad = torch.zeros_like(p)  # accumulation: the gradients exist before the step
            with LiveTensorMeter() as meter:
                net(x).square().sum().backward()
            peaks[checkpointed, depth] = meter.peak
    per_block = {c: (peaks[c, 8] - peaks[c, 4]) / 4 / state for c in (True, False)}
    assert 0.9 <= per_block[True] <= 1.1, per_block
    assert per_block[False] >= 8, per_block


def test_a_checkpointed_stack_refuses_huggingfaces_own_checkpointing() -> None:
    block = nn.Linear(4, 4)
    block.gradient_checkpointing = True  # as HuggingFace's layers carry it when it is on
    net = MomentumNet([block, nn.Linear(4, 4)], 0.9, use_backprop=False, method="checkpoint")
    with pytest.raises(InertiaError, match=r"checkpointed MomentumNet.*checkpoints each block"):
        net(torch.randn(2, 4, requires_grad=True))
