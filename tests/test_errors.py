"""Every misuse gets an error that names the problem and the fix."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from conftest import MLP
from inertia import InertiaError, MomentumNet
from inertia.testing import gradient_errors


@pytest.mark.parametrize("gamma", [-0.1, 1.5, float("nan")])
def test_gamma_out_of_range(gamma: float) -> None:
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        MomentumNet([MLP()], gamma)


@pytest.mark.parametrize("gamma", ["0.9", True, torch.tensor(0.9)])
def test_gamma_not_a_number(gamma: object) -> None:
    with pytest.raises(TypeError, match="gamma must be a real number"):
        MomentumNet([MLP()], gamma)  # type: ignore[arg-type]


def test_gamma_zero_memory_free_falls_back_to_backprop() -> None:
    """gamma = 0 is not invertible: a memory-free stack trains with backprop, after a warning
    that names the alternative (momentumnet's own example converts a ResNet at gamma 0)."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"dividing by gamma.*trains with backprop"):
        net = MomentumNet([MLP() for _ in range(3)], 0.0, use_backprop=False)
    twin = copy.deepcopy(net)
    twin.use_backprop = True
    with pytest.warns(UserWarning, match="dividing by gamma"):
        net.use_backprop = False  # the setter warns too
    x = torch.randn(4, 8, requires_grad=True)
    errors = gradient_errors(twin, net, x)
    assert max(errors.values()) == 0.0
    net = MomentumNet([MLP()], 0.5, use_backprop=False)
    with pytest.warns(UserWarning, match="dividing by gamma"):
        net.gamma = 0.0


def test_shape_change_names_block() -> None:
    net = MomentumNet([MLP(), nn.Linear(8, 4), MLP()], 0.9, use_backprop=False)
    with pytest.raises(InertiaError, match=r"block 1 \(Linear\) maps shape \(2, 8\) to \(2, 4\)"):
        net(torch.randn(2, 8, requires_grad=True))


class InPlace(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.tanh_()


@pytest.mark.parametrize("use_backprop", [True, False])
def test_in_place_names_block(use_backprop: bool) -> None:
    net = MomentumNet([MLP(), MLP(), InPlace()], 0.9, use_backprop=use_backprop)
    with pytest.raises(InertiaError, match=r"block 2 \(InPlace\) modified its input in place"):
        net(torch.randn(2, 8))


def test_block_returning_tuple() -> None:
    class Pair(nn.Module):
        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return x, x

    with pytest.raises(InertiaError, match=r"block 0 \(Pair\) returned tuple"):
        MomentumNet([Pair()], 0.9)(torch.randn(2, 3))


def test_init_function_shape() -> None:
    net = MomentumNet([MLP()], 0.9, init_speed=True, init_function=nn.Linear(8, 3))
    with pytest.raises(InertiaError, match=r"init_function \(Linear\) maps shape"):
        net(torch.randn(2, 8))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_unsupported_dtype(dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match=r"real floating-point input .* x.float\(\)"):
        MomentumNet([MLP()], 0.9)(torch.zeros(2, 8, dtype=dtype))


def test_not_a_tensor() -> None:
    with pytest.raises(TypeError, match="expects a tensor"):
        MomentumNet([MLP()], 0.9)([1.0] * 8)


def test_double_backward_names_alternative() -> None:
    net = MomentumNet([MLP()], 0.9, use_backprop=False)
    x = torch.randn(2, 8, requires_grad=True)
    (g,) = torch.autograd.grad(net(x).sum(), x, create_graph=False)
    with pytest.raises(InertiaError, match=r"double backward.*use_backprop=True"):
        torch.autograd.grad(net(x).sum(), x, create_graph=True)
    # The alternative works.
    net.use_backprop = True
    (g2,) = torch.autograd.grad(net(x).sum(), x, create_graph=True)
    assert g2.requires_grad
    assert torch.allclose(g, g2, atol=1e-6)


@pytest.mark.parametrize("exact", [True, False])
def test_output_modified_in_place_before_backward_names_the_fix(exact: bool) -> None:
    """The memory-free backward starts from the stack's output (float mode's x_N; exact mode's
    x_N is the output's float and a one-byte correction): changed in place before the backward,
    it cannot rebuild the activations, and says so (exact mode's output is one of a node's
    several views: autograd itself refuses an in-place change that records)."""
    net = MomentumNet([MLP() for _ in range(3)], gamma=0.9, use_backprop=False, exact=exact)
    x = torch.randn(4, 8, requires_grad=True)
    out = net(x)
    loss = out.sum()
    with torch.no_grad():
        out.mul_(2)
    with pytest.raises(InertiaError, match=r"output of this MomentumNet.*modified in place"):
        loss.backward()
    with pytest.raises(RuntimeError, match=r"modified in ?place"):
        net(x).relu_().sum().backward()
    net(x).clone().relu_().sum().backward()  # a clone of it: fine


def test_loss_through_a_blocks_captured_output_names_the_fix() -> None:
    """A block's output captured by a hook (as HuggingFace's output_hidden_states does) carries the
    memory-free forward's throwaway graph, which saved nothing."""
    net = MomentumNet([MLP() for _ in range(3)], gamma=0.9, use_backprop=False)
    captured: list[Tensor] = []
    net[1].register_forward_hook(lambda module, args, out: captured.append(out))
    net(torch.randn(4, 8, requires_grad=True))
    with pytest.raises(InertiaError, match="use_backprop=True"):
        captured[0].sum().backward()


def test_init_speed_without_function() -> None:
    with pytest.raises(ValueError, match="init_speed=True needs an init_function"):
        MomentumNet([MLP()], 0.9, init_speed=True)


def test_unused_init_function_warns() -> None:
    with pytest.warns(UserWarning, match="init_speed=False, so it is not used"):
        MomentumNet([MLP()], 0.9, init_function=nn.Linear(8, 8))


def test_non_module_block() -> None:
    with pytest.raises(TypeError, match=r"functions\[1\] is a builtin_function_or_method"):
        MomentumNet([MLP(), torch.tanh], 0.9)  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"check_inversion": "loud"}, "check_inversion='loud'"),
        ({"inversion_tol": 0.0}, "inversion_tol=0.0"),
    ],
)
def test_bad_check_settings(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MomentumNet([MLP()], 0.9, **kwargs)  # type: ignore[arg-type]
    net = MomentumNet([MLP()], 0.9)
    ((name, value),) = kwargs.items()
    with pytest.raises(ValueError, match=match):
        setattr(net, name, value)


def test_inverse_needs_matching_shapes() -> None:
    net = MomentumNet([MLP()], 0.9)
    with pytest.raises(ValueError, match="x has shape"):
        net.inverse(torch.zeros(2, 8), torch.zeros(3, 8))
