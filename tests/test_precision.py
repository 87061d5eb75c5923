"""Autocast is re-entered in the recomputation; float64 is never downcast."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from inertia import MomentumNet
from inertia.testing import gradient_errors


class Recording(nn.Module):
    """Records, at each call, whether autocast was on and the dtypes it saw."""

    def __init__(self, log: list[tuple[bool, torch.dtype, torch.dtype]]) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.log = log

    def forward(self, x: Tensor) -> Tensor:
        out = torch.tanh(self.lin(x))
        self.log.append((torch.is_autocast_enabled("cpu"), x.dtype, out.dtype))
        return out


def test_autocast_is_reentered_in_backward() -> None:
    log: list[tuple[bool, torch.dtype, torch.dtype]] = []
    net = MomentumNet([Recording(log) for _ in range(3)], 0.9, use_backprop=False)
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    out.float().sum().backward()  # outside autocast, as training loops do
    assert [entry[0] for entry in log] == [True] * 6
    assert {entry[2] for entry in log} == {torch.bfloat16}
    assert out.dtype == torch.float32  # the state x, v stays in float32


def test_autocast_gradients_match_backprop() -> None:
    """Under bf16 autocast: the recomputation is the forward's, so gradients agree to 1e-2."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)) for _ in range(8)]
    backprop = MomentumNet(blocks, 0.9)
    free = MomentumNet(blocks, 0.9, use_backprop=False)

    class Autocast(nn.Module):
        def __init__(self, net: MomentumNet) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: Tensor) -> Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.net(x)  # type: ignore[no-any-return]

    x = torch.randn(32, 16, requires_grad=True)
    errors = gradient_errors(Autocast(backprop), Autocast(free), x)
    assert max(errors.values()) < 1e-2, errors


@pytest.mark.parametrize("use_backprop", [True, False])
def test_float64_never_downcast(use_backprop: bool) -> None:
    log: list[tuple[bool, torch.dtype, torch.dtype]] = []
    net = MomentumNet([Recording(log) for _ in range(2)], 0.9, use_backprop=use_backprop).double()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    out.sum().backward()
    assert out.dtype == torch.float64
    assert {(e[1], e[2]) for e in log} == {(torch.float64, torch.float64)}
    assert x.grad is not None
    assert x.grad.dtype == torch.float64
