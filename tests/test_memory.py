"""Bytes saved for backward, counted with saved-tensor hooks kept active through the backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import MLP
from inertia import MomentumNet
from inertia._core import kernels
from inertia._core.exact import _schedule
from inertia.testing import LiveTensorMeter, SavedTensorMeter, backprop_twin, storage_key


def measure(net: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(bytes held after the forward, peak bytes over forward and backward)."""
    with SavedTensorMeter(ignore=net.parameters()) as meter:
        out = net(x)
        after_forward = meter.current
        out.sum().backward()
    assert meter.current == 0  # everything was released: the meter saw the whole life cycle
    return after_forward, meter.peak


def buffer_bytes(depth: int) -> int:
    """Bytes per element of exact mode's kept buffer after ``depth`` blocks at gamma 0.9."""
    return _schedule(9, 10, depth)[1].itemsize


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_saved_bytes_do_not_grow_with_depth(dropout: float, exact: bool) -> None:
    x = torch.randn(64, 32, requires_grad=True)
    results = {}
    for use_backprop in (True, False):
        for depth in (4, 64):
            blocks = [MLP(32, 64, dropout=dropout) for _ in range(depth)]
            net = MomentumNet(blocks, 0.9, use_backprop=use_backprop, exact=exact and None)
            results[use_backprop, depth] = measure(net, x)
    plain_growth = results[True, 64][0] - results[True, 4][0]
    free_growth = results[False, 64][0] - results[False, 4][0]
    peak_growth = results[False, 64][1] - results[False, 4][1]
    # Plain autograd keeps activations for every block: 60 more blocks, at least 60 x's more.
    assert plain_growth > 60 * x.numel() * 4
    # Memory-free: nothing grows with depth but, with dropout, one generator state per block that
    # drew random numbers (5 kB on the CPU, whatever the activation size), and in exact mode (the
    # default, exact=None) the buffer's log2(1/gamma) bits per element per block, kept in the
    # smallest integer dtype that holds them (1 byte per element at 4 blocks, 4 at 64).
    rng_states = 60 * torch.get_rng_state().nbytes if dropout else 0
    buffer = x.numel() * (buffer_bytes(64) - buffer_bytes(4)) if exact else 0
    assert free_growth == rng_states + buffer
    assert peak_growth - rng_states - buffer < 0.01 * plain_growth
    assert results[False, 64][1] - rng_states < results[True, 64][1] / 10


def test_meter_counts_what_autograd_saves() -> None:
    lin = nn.Linear(16, 16)
    x = torch.randn(8, 16, requires_grad=True)
    with SavedTensorMeter(ignore=lin.parameters()) as meter:
        y = lin(x).tanh()
        # Linear saves x (512 bytes), tanh saves its output (512 bytes); weights are ignored.
        assert meter.current == 2 * 8 * 16 * 4
        y.sum().backward()
    assert meter.current == 0
    assert meter.peak == 1024


class Wide(nn.Module):
    """Linear(d, h) - Tanh - Linear(h, d): its inner tensors have another size than the state."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def live_sets(
    net: nn.Module, x: torch.Tensor, n: int
) -> tuple[LiveTensorMeter, int, LiveTensorMeter]:
    """A training step's live tensors: its forward's, the bytes alive at the forward's end, and
    the whole step's, with the peak of the state-sized ones (``n`` elements) as role ``"state"``
    (``.grad`` already allocated, as under gradient accumulation)."""
    net(x).square().sum().backward()
    with LiveTensorMeter({"state": lambda e: e.numel == n}) as step:
        with LiveTensorMeter() as forward:
            loss = net(x).square().sum()
        kept = forward.current
        loss.backward()
    return forward, kept, step


@pytest.mark.parametrize("exact", [True, False])
def test_live_set_of_a_memory_free_step(exact: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The live set of a memory-free step, tensor by tensor (deterministic, on the CPU).

    After the forward: the saved state, 8 bytes per element of the state in float mode (``x_N``,
    which is the output, and ``v_N``), 10 in exact mode (``x_N`` as the output's float and an int8
    correction, int32 ``v_N`` and a one-byte buffer). The backward frees the saved state before
    the last block's (``_Finish``), which rewrites it or drops it as it goes: over the step,
    tensors of the state's size never hold more than, in exact mode, x's correction, v's word and
    the buffer (6 bytes per element; the float of x_N is gone once x_{N-1}'s is made) and six
    floats (at the last block, whose incoming gradient is the caller's and is not written into:
    that gradient, the adjoint, the block's input, the pullback's gradient of it, and the
    gradients handed down of ``x_{N-1}`` and ``v_{N-1}``); in float mode seven floats, the state
    among them (and the inversion check's random direction at block 0, for states of fewer than
    2**16 elements). At the step's peak, one block's recomputation (here at most three tensors
    of its hidden size: its Tanh output and, in its own backward, two gradients). No integer or
    float64 tensor of the state's size is made, forward or backward: the integer kernels'
    temporaries (run eagerly under the meter) are chunks of `CHUNK` elements. Plain autograd (the
    backprop twin) keeps every block's activations."""
    monkeypatch.setattr(kernels, "CHUNK", 4096)
    batch, d, h, depth = 256, 128, 192, 6
    n = batch * d  # the state's elements: 8 chunks
    blocks = [Wide(d, h) for _ in range(depth)]
    net = MomentumNet(blocks, 0.9, use_backprop=False, exact=exact)
    x = torch.randn(batch, d, requires_grad=True)
    forward, kept, step = live_sets(net, x, n)

    wide = [dt for dt, numel in step.largest.items() if dt.itemsize == 8 and numel > 4096]
    assert not wide, step.largest
    state = 10 * n if exact else 8 * n
    assert state <= kept < state + 32 * batch  # and the grid's constants, 28 bytes per row
    if exact:
        assert forward.largest[torch.int32] == n
        assert forward.largest[torch.uint8] == n
    assert step.peaks["state"] <= (6 * n + 6 * 4 * n if exact else 7 * 4 * n)

    grads = {storage_key(p.grad) for p in net.parameters()}
    at_peak = [e for key, e in step.at_peak.items() if key not in grads]
    inner = sum(e.nbytes for e in at_peak if e.numel == batch * h)
    assert inner <= 3 * 4 * batch * h

    _, twin_kept, _ = live_sets(backprop_twin(net), x, n)
    assert twin_kept > depth * 4 * batch * h  # every block's Tanh output, at least
    assert twin_kept > 4 * kept


class Probe(Wide):
    """`Wide` that records, during its pullback in the memory-free backward (where it runs with
    autograd recording), the bytes the meter's ``"state"`` role has alive."""

    def __init__(self, d: int, h: int, log: list[int], meter: list[LiveTensorMeter]) -> None:
        super().__init__(d, h)
        self.log, self.meter = log, meter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self.net[1](self.net[0](x))
        if torch.is_grad_enabled() and self.meter:
            inner.register_hook(lambda _: self.log.append(self.meter[0].alive("state")))
        out: torch.Tensor = self.net[2](inner)
        return out


def test_exact_backward_holds_x_in_a_byte_at_every_block() -> None:
    """Inside each block's pullback, the last's too, exact mode's backward holds x as the block's
    float input and an int8 correction, not also in its int32 word (which held x_{n-1}, 21 bytes
    per element then in the last block, where the saved state lived until the block returned).
    The live state-sized tensors: the int8 correction, the int32 v, the one-byte buffer, and
    three floats (the block's input, the incoming gradient and the adjoint), 18 bytes per
    element."""
    batch, d, h, depth = 256, 128, 192, 6
    n = batch * d
    log: list[int] = []
    meter: list[LiveTensorMeter] = []
    net = MomentumNet([Probe(d, h, log, meter) for _ in range(depth)], 0.9, use_backprop=False)
    x = torch.randn(batch, d, requires_grad=True)
    net(x).square().sum().backward()
    with LiveTensorMeter({"state": lambda e: e.numel == n}) as step:
        meter.append(step)
        net(x).square().sum().backward()
    assert len(log) == depth
    assert all(alive == 18 * n for alive in log), [a / n for a in log]


def test_live_tensor_meter_counts_what_lives() -> None:
    """A view or an in-place result is no new storage; a freed tensor leaves the count."""
    base = torch.zeros(1000)
    with LiveTensorMeter() as meter:
        a = torch.ones(1000)  # 4,000 bytes
        view = a[10:]
        base.add_(1)  # in place: nothing new
        b = a * 2  # 4,000 more
        del b
        c = torch.ones(10, dtype=torch.float64)  # 80, after b was freed
    assert meter.peak == 8000
    assert meter.current == 4080
    assert meter.largest == {torch.float32: 1000, torch.float64: 10}
    assert {e.op for e in meter.at_peak.values()} == {"aten.ones.default", "aten.mul.Tensor"}
    del view, c
