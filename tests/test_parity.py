"""Memory-free gradients against plain autograd on the same weights and inputs.

Every comparison uses `inertia.testing.TOLERANCES` (relative error per tensor): float64 1e-10,
float32 1e-5. The memory-free model is compared with its backprop twin (`twins`), which has its
arithmetic: exact, the default, unless a test pins ``exact=False``. In float mode, where rounding
is predicted to exceed a tenth of the tolerance (``eps * gamma**-depth``), the memory-free model
must either match or report the drift; exact mode must match everywhere.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import DTYPES, MLP, ArgBlock, LoopNet, twins
from inertia import InversionError, MomentumNet
from inertia.testing import TOLERANCES, assert_gradients_match, gradient_errors, relative_error


def predicted_drift(dtype: torch.dtype, gamma: float, depth: int) -> float:
    return torch.finfo(dtype).eps * gamma**-depth


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("depth", [1, 4, 16, 64])
def test_grid(depth: int, gamma: float, dtype: torch.dtype) -> None:
    net = MomentumNet([MLP() for _ in range(depth)], gamma, exact=False).to(dtype)
    backprop, free, loop = twins(net)
    x = torch.randn(5, 8, dtype=dtype, requires_grad=True)
    tol = TOLERANCES[dtype]
    # The backprop mode is the hand-written loop, to the last bit.
    assert max(gradient_errors(loop, backprop, x).values()) == 0.0
    if predicted_drift(dtype, gamma, depth) <= tol / 10:
        assert_gradients_match(backprop, free, x)
        return
    # Float rounding may matter here: the model must be right or say that it is not. The sketch
    # estimates the drift within about 2x, so the check is set below the tolerance.
    free.check_inversion = None
    error = max(gradient_errors(backprop, free, x).values())
    free.check_inversion, free.inversion_tol = "raise", tol / 4
    if error > tol:  # wrong: the check must say so
        with pytest.raises(InversionError):
            free(x).sum().backward()
    elif error <= tol / 100:  # right by a wide margin: the check must stay quiet
        free(x).sum().backward()
    # In between, the gradients are right and an alarm would be a cautious one.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("depth", [1, 4, 16, 64])
def test_grid_default_exact(depth: int, gamma: float, dtype: torch.dtype) -> None:
    """The default (exact) memory-free mode matches its twin in every cell, float's hopeless ones
    included, and its reconstruction check stays quiet."""
    net = MomentumNet([MLP() for _ in range(depth)], gamma, check_inversion="raise").to(dtype)
    backprop, free, _ = twins(net)
    assert free.exact
    assert backprop.exact
    assert_gradients_match(backprop, free, torch.randn(5, 8, dtype=dtype, requires_grad=True))


@pytest.mark.parametrize(
    ("dtype", "gamma", "depth"),
    [(torch.float32, 0.5, 16), (torch.float32, 0.9, 64), (torch.float64, 0.5, 64)],
)
def test_drift_is_reported(dtype: torch.dtype, gamma: float, depth: int) -> None:
    """Cells where float inversion is hopeless: the gradients are wrong, and float mode's default
    check warns."""
    net = MomentumNet([MLP() for _ in range(depth)], gamma, exact=False).to(dtype)
    backprop, free, _ = twins(net)
    x = torch.randn(5, 8, dtype=dtype, requires_grad=True)
    free.check_inversion = None
    errors = gradient_errors(backprop, free, x)
    assert max(errors.values()) > TOLERANCES[dtype]  # the drift is real
    free.check_inversion = "warn"
    free.inversion_tol = TOLERANCES[dtype]
    with pytest.warns(UserWarning, match=r"differs from the forward's by about"):
        free(x).sum().backward()
    free.check_inversion = "raise"
    with pytest.raises(InversionError, match=r"gamma=.*depth=.*Use exact=True, a larger gamma"):
        free(x).sum().backward()


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_residual", [True, False])
def test_init_speed_and_is_residual(dtype: torch.dtype, is_residual: bool, exact: bool) -> None:
    init = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
    net = MomentumNet(
        [MLP() for _ in range(6)],
        0.9,
        init_speed=True,
        init_function=init,
        is_residual=is_residual,
        exact=exact,
    ).to(dtype)
    backprop, free, loop = twins(net)
    x = torch.randn(5, 8, dtype=dtype, requires_grad=True)
    # Float backprop is the hand-written loop to the last bit; exact's grid is within tolerance.
    assert_gradients_match(loop, backprop, x, rtol=None if exact else 0.0)
    errors = assert_gradients_match(backprop, free, x)
    assert "grad.init.0.weight" in errors


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_is_replayed(dtype: torch.dtype) -> None:
    net = MomentumNet([MLP(dropout=0.3) for _ in range(8)], 0.9).to(dtype)
    backprop, free, _ = twins(net)
    x = torch.randn(16, 8, dtype=dtype, requires_grad=True)
    assert_gradients_match(backprop, free, x, seed=3)
    # Without the same seed the outputs differ: the test would notice a replay with other masks.
    errors = gradient_errors(backprop, free, x, seed=None)
    assert errors["output"] > 1e-3


def test_forward_draws_what_backprop_draws() -> None:
    net = MomentumNet([MLP(dropout=0.5) for _ in range(4)], 0.9)
    backprop, free, _ = twins(net)
    x = torch.randn(16, 8, requires_grad=True)
    states = []
    for model in (backprop, free):
        torch.manual_seed(1)
        out = model(x)
        states.append(torch.get_rng_state())
        out.sum().backward()  # the replay must not move the generator either
        assert torch.equal(torch.get_rng_state(), states[-1])
    assert torch.equal(states[0], states[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_batchnorm_three_steps(dtype: torch.dtype) -> None:
    """Running statistics and num_batches_tracked end as plain autograd leaves them."""
    net = MomentumNet([MLP(bn=True) for _ in range(6)], 0.9).to(dtype).train()
    backprop, free, _ = twins(net)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (backprop, free)]
    for step in range(3):
        x = torch.randn(16, 8, dtype=dtype, requires_grad=True)
        errors = assert_gradients_match(backprop, free, x)
        assert "buffer.0.net.1.running_mean" in errors
        for opt in opts:
            opt.step()
            opt.zero_grad()
        assert int(free[0].net[1].num_batches_tracked) == step + 1
    for (name, a), (_, b) in zip(
        backprop.state_dict().items(), free.state_dict().items(), strict=True
    ):
        assert a.dtype == b.dtype
        assert relative_error(b, a) <= TOLERANCES[dtype], name


@pytest.mark.parametrize("dtype", DTYPES)
def test_frozen_parameters(dtype: torch.dtype) -> None:
    net = MomentumNet([MLP() for _ in range(6)], 0.9).to(dtype)
    for i in (0, 3):  # whole blocks
        net[i].requires_grad_(False)
    net[4].net[0].weight.requires_grad_(False)  # one tensor of a block
    backprop, free, _ = twins(net)
    x = torch.randn(5, 8, dtype=dtype, requires_grad=True)
    errors = assert_gradients_match(backprop, free, x)
    assert "grad.0.net.0.weight" not in errors
    assert free[0].net[0].weight.grad is None
    assert free[4].net[0].weight.grad is None
    assert free[4].net[0].bias.grad is not None


@pytest.mark.parametrize("dtype", DTYPES)
def test_input_without_grad(dtype: torch.dtype) -> None:
    net = MomentumNet([MLP() for _ in range(4)], 0.9).to(dtype)
    backprop, free, _ = twins(net)
    assert_gradients_match(backprop, free, torch.randn(5, 8, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_unused_parameters(dtype: torch.dtype) -> None:
    class Unused(MLP):
        def __init__(self) -> None:
            super().__init__()
            self.spare = nn.Linear(8, 8)

    net = MomentumNet([Unused() for _ in range(4)], 0.9).to(dtype)
    backprop, free, _ = twins(net)
    assert_gradients_match(backprop, free, torch.randn(5, 8, dtype=dtype, requires_grad=True))
    assert free[0].spare.weight.grad is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_tied_blocks(dtype: torch.dtype) -> None:
    shared = MLP()
    net = MomentumNet([shared, MLP(), shared, shared], 0.9).to(dtype)
    backprop, free, _ = twins(net)
    assert free[0] is free[2] is free[3]
    errors = assert_gradients_match(
        backprop, free, torch.randn(5, 8, dtype=dtype, requires_grad=True)
    )
    assert "grad.0.net.0.weight" in errors


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_extra_args_and_kwargs(dtype: torch.dtype, exact: bool) -> None:
    net = MomentumNet([ArgBlock() for _ in range(5)], 0.9, exact=exact).to(dtype)
    backprop, free, loop = twins(net)
    x = torch.randn(5, 8, dtype=dtype, requires_grad=True)
    scale = torch.rand(5, 1, dtype=dtype, requires_grad=True)
    shift = torch.randn(8, dtype=dtype, requires_grad=True)
    kwargs = {"shift": shift, "power": 2}
    assert_gradients_match(loop, backprop, x, scale, rtol=None if exact else 0.0, **kwargs)
    errors = assert_gradients_match(backprop, free, x, scale, **kwargs)
    assert errors["input.1"] <= TOLERANCES[dtype]
    # Keyword tensors get their gradients, summed over blocks, too.
    grads = []
    for model in (backprop, free):
        s = shift.detach().clone().requires_grad_()
        model(x, scale, shift=s, power=2).sum().backward()
        grads.append(s.grad)
    assert relative_error(grads[1], grads[0]) <= TOLERANCES[dtype]
    # None and a tensor that needs no gradient are fine.
    free(x, scale.detach(), shift=None).sum().backward()


def test_gradcheck() -> None:
    net = MomentumNet(
        [MLP(3, 4) for _ in range(3)],
        0.8,
        init_speed=True,
        init_function=nn.Linear(3, 3),
        use_backprop=False,
    ).double()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(2, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: net(x, return_velocity=True), (x,))
    arg_net = MomentumNet([ArgBlock(3) for _ in range(3)], 0.7, use_backprop=False).double()
    assert torch.autograd.gradcheck(lambda x, s: arg_net(x, s), (x, scale))
    params = list(net.parameters())
    fn = lambda x, *ps: net(x)  # noqa: E731  (parameters are inputs so gradcheck perturbs them)
    assert torch.autograd.gradcheck(fn, (x, *params))


def test_velocity_output_gradient() -> None:
    net = MomentumNet([MLP() for _ in range(5)], 0.9).double()
    backprop, free, _ = twins(net)
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)

    def loss(out: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return (out[0] * 2).sum() + out[1].pow(2).sum()

    assert_gradients_match(backprop, free, x, loss_fn=loss, return_velocity=True)


def test_several_forwards_then_one_backward() -> None:
    net = MomentumNet([MLP() for _ in range(5)], 0.9).double()
    backprop, free, _ = twins(net)
    xs = [torch.randn(5, 8, dtype=torch.float64) for _ in range(3)]
    for model in (backprop, free):
        sum(model(x).pow(2).sum() for x in xs).backward()  # type: ignore[union-attr]
    for (name, a), (_, b) in zip(backprop.named_parameters(), free.named_parameters(), strict=True):
        assert relative_error(b.grad, a.grad) <= TOLERANCES[torch.float64], name


def test_retain_graph_second_backward() -> None:
    net = MomentumNet([MLP(dropout=0.2) for _ in range(5)], 0.9, use_backprop=False).double()
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    loss = net(x).pow(2).sum()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in net.parameters()]  # type: ignore[union-attr]
    loss.backward()  # the same graph again: the same gradients again
    for g, p in zip(first, net.parameters(), strict=True):
        assert torch.equal(p.grad, 2 * g)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def test_is_loop_of_blocks_copy() -> None:
    """LoopNet is an independent reference: it sees the same weights, not the same objects."""
    net = MomentumNet([MLP() for _ in range(2)], 0.9)
    _, free, loop = twins(net)
    assert isinstance(loop, LoopNet)
    assert free[0].net[0].weight is not loop._modules["0"].net[0].weight  # type: ignore[union-attr]
    assert torch.equal(free[0].net[0].weight, loop._modules["0"].net[0].weight)  # type: ignore[union-attr]


def test_drift_is_reported_on_large_tensors() -> None:
    """Past 65,536 elements the sketch uses a strided subsample: it still sees the drift."""
    net = MomentumNet([MLP(256, 64) for _ in range(24)], 0.5, check_inversion="raise", exact=False)
    backprop, free, _ = twins(net)
    free.check_inversion = "raise"
    x = torch.randn(512, 256, requires_grad=True)  # 131,072 elements
    free.check_inversion = None
    assert max(gradient_errors(backprop, free, x).values()) > 1e-3  # the drift is real
    free.check_inversion = "raise"
    with pytest.raises(InversionError):
        free(x).sum().backward()
    # And where the inversion is accurate, the subsampled check stays quiet.
    fine = MomentumNet([MLP(256, 64) for _ in range(4)], 0.9, use_backprop=False, exact=False)
    fine.check_inversion = "raise"
    fine(x).sum().backward()


def test_zero_input_is_not_reported_as_drift() -> None:
    # (x_0, v_0) = 0 leaves nothing to measure drift relative to; it is then measured absolutely.
    net = MomentumNet(
        [MLP() for _ in range(8)], 0.9, use_backprop=False, check_inversion="raise", exact=False
    )
    net(torch.zeros(4, 8, requires_grad=True)).sum().backward()


def test_drift_sketch_sees_every_part_of_the_layout() -> None:
    """The inversion check's subsample is random, not strided: drift confined to the columns that
    a stride would skip (here every w = 1 mod 4 of an NCHW tensor) still moves the sketch."""
    from inertia._core.arith import _sketch

    x = torch.randn(1, 64, 64, 64)
    v = torch.randn_like(x)
    drifted = x.clone()
    drifted[..., 1::4] += 1e-2
    assert not torch.equal(_sketch(x, v), _sketch(drifted, v))
    assert torch.equal(_sketch(x, v), _sketch(x.clone(), v))  # the same directions every call
