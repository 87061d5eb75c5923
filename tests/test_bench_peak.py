"""The true peak of a training step (`inertia.bench.true_peak`): the fresh-process protocol, the
two gradient states, the choice between resident memory and the CUDA allocator, and, where Linux
lets a process reset its resident high-water mark, that the measured peaks order as they must."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from inertia.bench import (
    LEAN_RESNET,
    VARIANTS,
    IntegerFloor,
    PeakCase,
    TruePeak,
    measure_step_peaks,
    stack_saved_bytes,
    true_peak,
)
from inertia.bench import _peak as peak
from inertia.bench._steps import build

TINY = PeakCase("mlp", depth=2, batch=8, width=16)
#: Activations dominate: plain keeps about 3 MiB per block, checkpointing 1 MiB.
DEEP = PeakCase("mlp", depth=16, batch=1024, width=256)


def clear_refs_works() -> bool:
    if sys.platform != "linux":
        return False
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread (and much faster on a machine with a busy core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class GradProbe(nn.Module):
    """Records, at every forward, whether each parameter of ``net`` has a ``.grad``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.seen: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        grads = [p.grad is not None for p in self.net.parameters()]
        assert len(set(grads)) == 1  # all or none
        self.seen.append(grads[0])
        return self.net(x)  # type: ignore[no-any-return]


def test_child_returns_well_formed_results() -> None:
    result = true_peak(TINY, "momentum_free", optimizer="sgd", threads=1)
    assert isinstance(result, TruePeak)
    assert (result.case, result.variant, result.device) == (TINY.label(), "momentum_free", "cpu")
    blocks = TINY.depth * 2 * (TINY.width**2 + TINY.width) * 4
    assert result.parameter_bytes == blocks
    assert result.saved_bytes > 0
    assert result.grad_unset.grad_bytes == 0
    assert result.grad_accumulated.grad_bytes == blocks  # every parameter has its .grad
    assert result.optimizer_step is not None
    assert result.optimizer_step.grad_bytes == blocks
    for step in (result.grad_unset, result.grad_accumulated, result.optimizer_step):
        assert step.method == "rss"
        if step.reason:  # no resident peak on this machine: nan, and why
            assert math.isnan(step.peak_bytes)
        else:
            assert step.peak_bytes >= 0
            assert step.before_bytes > 10 * 2**20  # at least the interpreter and torch


@pytest.mark.parametrize("optimizer", [None, "adam"])
def test_accumulation_has_grads_before_the_step(optimizer: str | None) -> None:
    probe = GradProbe(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)))
    unset, accumulated, opt_step = measure_step_peaks(
        probe, (torch.randn(4, 8),), optimizer=optimizer
    )
    # Warm-up (nothing yet), .grad unset (zero_grad(set_to_none=True)), accumulation.
    assert probe.seen == [False, False, True]
    param_bytes = sum(p.nbytes for p in probe.parameters())
    assert (unset.grad_bytes, accumulated.grad_bytes) == (0, param_bytes)
    assert (opt_step is None) == (optimizer is None)


def test_without_warm_up_the_callers_step_counts() -> None:
    probe = GradProbe(nn.Linear(8, 8))
    measure_step_peaks(probe, (torch.randn(4, 8),), warm_up=False)
    assert probe.seen == [False, True]


def test_gpu_branch_only_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    assert peak.peak_method(torch.device("cpu")) == "rss"
    assert peak.peak_method(torch.device("cuda", 0)) == "cuda"

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the CUDA allocator was read on the CPU")

    for name in ("reset_peak_memory_stats", "memory_allocated", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    steps = measure_step_peaks(nn.Linear(4, 4), (torch.randn(2, 4),), optimizer="sgd")
    assert all(s is not None and s.method == "rss" for s in steps)


@pytest.mark.cuda
def test_cuda_peak_reads_the_allocator() -> None:
    model, inputs = build(DEEP, "plain", torch.device("cuda"))
    unset, accumulated, _ = measure_step_peaks(model, inputs)
    assert unset.method == accumulated.method == "cuda"
    assert unset.reason == ""
    # Plain autograd keeps at least the 16 blocks' inputs (1 MiB each) and allocates the gradients.
    assert unset.peak_bytes > 16 * 2**20 + accumulated.grad_bytes
    assert accumulated.before_bytes >= unset.before_bytes + accumulated.grad_bytes


@pytest.mark.cuda
def test_true_peak_on_cuda_checkpointing_holds_less() -> None:
    plain = true_peak(DEEP, "plain", device="cuda")
    ckpt = true_peak(DEEP, "checkpoint", device="cuda")
    assert plain.grad_unset.method == "cuda"
    assert plain.grad_unset.peak_bytes > 1.5 * ckpt.grad_unset.peak_bytes


def test_unreadable_rss_is_nan_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert "MALLOC_MMAP_THRESHOLD_=65536" in peak.rss_unavailable()
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    monkeypatch.setattr(peak, "CLEAR_REFS", tmp_path / "no-proc" / "clear_refs")
    if sys.platform == "linux":
        assert "clear_refs" in peak.rss_unavailable()
    unset, accumulated, _ = measure_step_peaks(nn.Linear(4, 4), (torch.randn(2, 4),))
    for step in (unset, accumulated):
        assert math.isnan(step.peak_bytes)
        assert step.reason
    monkeypatch.setattr(sys, "platform", "darwin")
    assert "Linux" in peak.rss_unavailable()


@pytest.mark.parametrize(
    ("case", "variants"),
    [
        (PeakCase("encoder", depth=2, batch=2, width=16, seq_len=8, heads=2), VARIANTS),
        (TINY, VARIANTS),
        # Exact mode compiles its kernels for each new shape: seconds; the benchmark covers it.
        (PeakCase("resnet18", batch=2, image_size=32), ("plain", "checkpoint", "momentum_free")),
    ],
    ids=["encoder", "mlp", "resnet18"],
)
def test_every_case_builds_and_trains(
    case: PeakCase, variants: tuple[str, ...], one_thread: None
) -> None:
    for variant in variants:
        model, inputs = build(case, variant, torch.device("cpu"))
        assert model.training
        model(*inputs).square().mean().backward()
        assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    if case.model != "mlp":
        with pytest.raises(ValueError, match=f"not measured on {case.model}"):
            build(case, "momentumnet_0.10", torch.device("cpu"))
    if not case.model.startswith("resnet"):
        for variant in LEAN_RESNET:
            assert not case.runs(variant)
            with pytest.raises(ValueError, match=f"not measured on {case.model}"):
                build(case, variant, torch.device("cpu"))


def test_lean_resnet_checkpoints_the_stem_and_first_blocks(one_thread: None) -> None:
    """momentum_free_ckpt_stem_first: the memory-free ResNet with its stem and each stage's first
    block checkpointed, which changes what is kept, not the gradients."""
    from inertia import MomentumNet
    from inertia.models.resnet import CheckpointedStemResNet

    case = PeakCase("resnet18", batch=2, image_size=32)
    assert case.runs("momentum_free_ckpt_stem_first")
    grads = {}
    for variant in ("momentum_free", "momentum_free_ckpt_stem_first"):
        model, (x,) = build(case, variant, torch.device("cpu"))
        stages = [m for m in model.modules() if isinstance(m, MomentumNet)]
        assert len(stages) == 4
        lean = variant != "momentum_free"
        assert isinstance(model, CheckpointedStemResNet) == lean
        assert all(stage.checkpoint_kept == lean and stage.keep_first == 1 for stage in stages)
        model(x).square().mean().backward()
        grads[variant] = [p.grad for p in model.parameters()]
    for a, b in zip(*grads.values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(not clear_refs_works(), reason="needs Linux's /proc/self/clear_refs")
def test_plain_peaks_above_checkpointing() -> None:
    plain = true_peak(DEEP, "plain", threads=1)
    ckpt = true_peak(DEEP, "checkpoint", threads=1)
    for r in (plain, ckpt):
        assert r.grad_unset.reason == ""
    # The baseline really holds more: every block's activations against one input per block.
    assert plain.grad_unset.peak_bytes > 1.5 * ckpt.grad_unset.peak_bytes
    assert plain.grad_accumulated.peak_bytes > 1.5 * ckpt.grad_accumulated.peak_bytes
    # The resident peak covers at least what autograd saved (parameters are not in either).
    assert plain.grad_unset.peak_bytes > 0.9 * plain.saved_bytes
    # Under accumulation the gradients were resident before the step: not in its peak.
    assert plain.grad_accumulated.before_bytes > plain.grad_unset.before_bytes


def test_stack_saved_bytes_counts_the_stack_alone() -> None:
    """An encoder's stack: plain grows with depth, checkpointing keeps each layer's input,
    memory-free keeps its final state whatever the depth; the input projection and the final
    LayerNorm outside the stack are not counted."""
    found: dict[str, list[int]] = {}
    for depth in (2, 4):
        case = PeakCase("encoder", depth=depth, width=32, batch=2, seq_len=8, heads=4)
        for variant in ("plain", "checkpoint", "momentum_free"):
            model, (x,) = build(case, variant, torch.device("cpu"), for_memory=True)
            held = stack_saved_bytes(model, (x.requires_grad_(),), model.get_submodule("layers"))
            found.setdefault(variant, []).append(held)
    state = 2 * 8 * 32 * 4  # one float32 (batch, seq, width) tensor
    assert found["plain"][1] == 2 * found["plain"][0] > 10 * state
    assert found["checkpoint"] == [2 * state, 4 * state]
    assert found["momentum_free"][0] == found["momentum_free"][1] >= 2 * state  # x_N and v_N


@pytest.mark.parametrize("model", ["mlp", "encoder"])
def test_floor_runs_the_integer_update_and_its_inverse(model: str) -> None:
    """The floor variant is checkpointing (same gradients) plus the integer kernels, whose
    inverse in the backward brings the stack's shared integers back to where they started."""
    if model == "mlp":
        case = PeakCase("mlp", depth=3, batch=64, width=128)  # 8,192 elements: compiled
    else:
        case = PeakCase("encoder", depth=2, batch=2, width=16, seq_len=8, heads=2)
    floor, (x,) = build(case, "floor", torch.device("cpu"))
    checkpointed, _ = build(case, "checkpoint", torch.device("cpu"))
    floor(x).square().mean().backward()
    checkpointed(x).square().mean().backward()
    blocks = [m for m in floor.modules() if isinstance(m, IntegerFloor)]
    assert len(blocks) == case.depth
    (ints,) = blocks[0].integers.values()  # one state, shared by the stack's blocks
    assert all(b.integers is blocks[0].integers for b in blocks)
    assert not any(bool(t.any()) for t in ints)  # x, v and the buffer: back to zero
    for p, q in zip(floor.parameters(), checkpointed.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("variant", ["checkpoint", "checkpoint_whole", "floor"])
def test_floors_recompute_each_block_whole(variant: str) -> None:
    """A memory-free stack's inverse reads each block's output, so its floors recompute the whole
    block; checkpointing's early stop (what users get) skips an MLP block's second Linear, whose
    output no backward reads. Counted by the second Linear's forward hook over one step."""
    case = PeakCase("mlp", depth=3, batch=64, width=128)
    model, (x,) = build(case, variant, torch.device("cpu"))
    calls = []
    for block in model.modules():
        if isinstance(block, nn.Sequential):
            block[2].register_forward_hook(lambda *_: calls.append(1))
    model(x).square().mean().backward()
    recomputed = len(calls) - case.depth
    assert recomputed == (0 if variant == "checkpoint" else case.depth)
