"""Autocast is re-entered in the recomputation; float64 is never downcast."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from inertia import MomentumNet
from inertia.testing import backprop_twin, gradient_errors, relative_error


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


@pytest.mark.parametrize("exact", [False, True])
def test_autocast_gradients_match_backprop(exact: bool) -> None:
    """Under bf16 autocast the recomputation runs the forward's bf16 kernels, so memory-free
    gradients are backprop's to float32 rounding (a recomputation outside autocast gives 1e-3
    here: bf16's own error against float32, which is also checked to be there)."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)) for _ in range(8)]
    backprop = MomentumNet(blocks, 0.9, exact=exact)
    free = MomentumNet(blocks, 0.9, use_backprop=False, exact=exact)

    class Autocast(nn.Module):
        def __init__(self, net: MomentumNet) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: Tensor) -> Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.net(x)  # type: ignore[no-any-return]

    class Plain(Autocast):
        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)  # type: ignore[no-any-return]

    x = torch.randn(32, 16, requires_grad=True)
    assert max(gradient_errors(Autocast(backprop), Autocast(free), x).values()) <= 1e-6
    truth = {
        name: max(gradient_errors(Plain(backprop), Autocast(net), x).values())
        for name, net in (("backprop", backprop), ("free", free))
    }
    assert truth["backprop"] > 1e-4, truth  # bf16 really ran
    assert truth["free"] <= truth["backprop"] * (1 + 1e-3), truth


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


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_steps_with_grad_scaler(dtype: torch.dtype, exact: bool) -> None:
    """Three optimizer steps under autocast (fp16 with a GradScaler): memory-free training follows
    its backprop twin's. Stated tolerance: 1e-4 relative on each parameter's update (measured:
    float mode 0 in bf16 and 9e-6 in fp16, where the float inverse meets block outputs rounded to
    8 or 11 bits; exact mode, the default, 0 in both)."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)) for _ in range(6)]
    free = MomentumNet(blocks, 0.9, use_backprop=False, exact=exact)
    base = backprop_twin(free)
    models = [base, free]
    scalers = [torch.amp.GradScaler("cpu", enabled=dtype == torch.float16) for _ in models]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    xs = [torch.randn(32, 16) for _ in range(3)]
    start = [p.detach().clone() for p in base.parameters()]
    for model, scaler, opt in zip(models, scalers, opts, strict=True):
        for x in xs:
            opt.zero_grad()
            with torch.autocast("cpu", dtype=dtype):
                loss = model(x).float().square().mean()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    for (name, a), (_, b), p0 in zip(
        models[0].named_parameters(), models[1].named_parameters(), start, strict=True
    ):
        # Compare what training changed, not the weights (which 3 steps barely move).
        assert relative_error(b - p0, a - p0) < 1e-4, name
        assert float((a.detach() - p0).norm()) > 0  # the steps did something (none skipped)
        assert b.dtype == torch.float32  # master weights stay float32
