"""Bytes saved for backward, counted with saved-tensor hooks kept active through the backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import MLP
from inertia import MomentumNet
from inertia._core.exact import _schedule
from inertia.testing import SavedTensorMeter


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
