"""The memory-free backward is a chain of one autograd node per block: gradients leave block by
block, and each recomputation uses what its forward used."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from conftest import DTYPES, MLP, ArgBlock, twins
from inertia import InertiaError, InversionError, MomentumNet
from inertia.testing import assert_gradients_match, backprop_twin


def events_of_a_step(net: MomentumNet, x: Tensor) -> tuple[list[Any], list[Any]]:
    """The forward's and the backward's events: ("run", n) when block n starts, ("grad", n) when
    block n's parameter gradients have accumulated into ``.grad``."""
    events: list[tuple[str, int]] = []
    for n, block in enumerate(net):
        block.register_forward_pre_hook(lambda *_, n=n: events.append(("run", n)))
        for p in block.parameters():
            p.register_post_accumulate_grad_hook(lambda _, n=n: events.append(("grad", n)))
    out = net(x).square().sum()
    forward = list(events)
    events.clear()
    out.backward()
    backward = [e for i, e in enumerate(events) if i == 0 or events[i - 1] != e]  # one per block
    return forward, backward


@pytest.mark.parametrize("exact", [False, True])
def test_gradients_leave_block_by_block(exact: bool) -> None:
    """Block n's gradients are in .grad before block n-1 is recomputed (DDP's hooks fire per
    block, and no block's gradients wait for the whole stack)."""
    depth = 5
    net = MomentumNet([MLP() for _ in range(depth)], 0.9, use_backprop=False, exact=exact)
    forward, backward = events_of_a_step(net, torch.randn(4, 8, requires_grad=True))
    assert forward == [("run", n) for n in range(depth)]
    assert backward == [e for n in reversed(range(depth)) for e in (("run", n), ("grad", n))]
    # The backprop twin accumulates in the same block order.
    net.use_backprop = True
    _, backward = events_of_a_step(net, torch.randn(4, 8))
    assert backward == [("grad", n) for n in reversed(range(depth))]


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_accumulation_in_place(dtype: torch.dtype) -> None:
    """With .grad allocated (a second micro-batch), gradients accumulate into the same tensors."""
    net = MomentumNet([MLP() for _ in range(6)], 0.9).to(dtype)
    backprop, free, _ = twins(net)
    xs = [torch.randn(4, 8, dtype=dtype) for _ in range(2)]
    for model in (backprop, free):
        model(xs[0]).square().sum().backward()
    ids = {n: id(p.grad) for n, p in free.named_parameters()}
    for model in (backprop, free):
        model(xs[1]).square().sum().backward()
    assert {n: id(p.grad) for n, p in free.named_parameters()} == ids
    for (name, p), q in zip(free.named_parameters(), backprop.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_autograd_grad_returns_parameter_gradients() -> None:
    net = MomentumNet([MLP() for _ in range(4)], 0.9, use_backprop=False).double()
    backprop = backprop_twin(net)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    got = torch.autograd.grad(net(x).square().sum(), [x, *net.parameters()])
    want = torch.autograd.grad(backprop(x).square().sum(), [x, *backprop.parameters()])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in net.parameters())  # nothing accumulated


def test_gradients_of_only_some_blocks() -> None:
    """autograd.grad for the last block's weight runs only the nodes above it."""
    net = MomentumNet([MLP() for _ in range(4)], 0.9, use_backprop=False).double()
    backprop = backprop_twin(net)
    x = torch.randn(4, 8, dtype=torch.float64)
    runs: list[int] = []
    for n, block in enumerate(net):
        block.register_forward_pre_hook(lambda *_, n=n: runs.append(n))
    (got,) = torch.autograd.grad(net(x).sum(), [net[3].net[0].weight])
    (want,) = torch.autograd.grad(backprop(x).sum(), [backprop[3].net[0].weight])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert runs == [0, 1, 2, 3, 3]


class PlusParameter(nn.Module):
    """``tanh(x) + p`` with ``p`` of the input's shape: autograd hands ``p`` the very gradient of
    the output (an addition passes it through), so the node must not overwrite that tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.randn(4, 8))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x) + self.p


class Identity(nn.Module):
    """``f(x) = x`` as a view: the input's gradient is the output's, the same storage."""

    def forward(self, x: Tensor) -> Tensor:
        return x.view_as(x)


class RowSum(nn.Module):
    """``f(x)`` = the row sums, broadcast: the input's gradient is an expanded tensor (stride 0),
    which cannot be written in place."""

    def forward(self, x: Tensor) -> Tensor:
        return 0.1 * torch.tanh(x.sum(-1, keepdim=True)).expand_as(x)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("is_residual", [True, False])
@pytest.mark.parametrize("block", [PlusParameter, Identity, RowSum])
def test_blocks_whose_gradients_alias(
    block: type[nn.Module], is_residual: bool, exact: bool
) -> None:
    """The nodes write the gradients handed between them in place; gradients that autograd
    returns (which may alias the output's gradient, or be expanded) stay as they are."""

    class Whole(block):  # type: ignore[misc, valid-type]
        def forward(self, x: Tensor) -> Tensor:
            return x + super().forward(x)

    blocks = [(block if is_residual else Whole)() for _ in range(5)]
    net = MomentumNet(blocks, 0.9, is_residual=is_residual, exact=exact).double()
    backprop, free, _ = twins(net)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    assert_gradients_match(backprop, free, x)


def test_init_function_with_tensor_arguments() -> None:
    """The init function takes x only, while the blocks take extra tensor arguments."""
    net = MomentumNet(
        [ArgBlock() for _ in range(3)], 0.9, init_speed=True, init_function=nn.Linear(8, 8)
    ).double()
    backprop, free, _ = twins(net)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert_gradients_match(backprop, free, x, scale, shift=torch.randn(8, dtype=torch.float64))


class Counter(nn.Module):
    """Not deterministic: its output depends on a Python counter, invisible to inertia."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.lin(x) * self.calls


def test_reconstruction_checked_below_frozen_blocks() -> None:
    """Frozen first blocks and an input without grad: the backward still rebuilds the input and
    checks it (exact mode raises on the non-deterministic frozen block)."""
    counter = Counter().requires_grad_(False)
    net = MomentumNet([counter, MLP(), MLP()], 0.9, use_backprop=False, exact=True)
    out = net(torch.randn(4, 8))
    with pytest.raises(InversionError, match="did not rebuild"):
        out.sum().backward()


# -- what the forward used ----------------------------------------------------------------------


def test_parameter_changed_in_place_before_backward_raises() -> None:
    """An optimizer step between forward and backward: autograd's error, as with backprop."""
    for use_backprop in (True, False):
        net = MomentumNet([MLP() for _ in range(3)], 0.9, use_backprop=use_backprop)
        out = net(torch.randn(4, 8, requires_grad=True))
        with torch.no_grad():
            net[1].net[0].weight.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


@pytest.mark.parametrize("exact", [False, True])
def test_functional_call_substituted_weights(exact: bool) -> None:
    """torch.func.functional_call: gradients are those of the substituted tensors, in the
    forward that used them; the module's own weights get none."""
    net = MomentumNet([MLP() for _ in range(4)], 0.9, use_backprop=False, exact=exact).double()
    backprop = backprop_twin(net)
    x = torch.randn(4, 8, dtype=torch.float64)
    new = {n: torch.randn_like(p, requires_grad=True) for n, p in net.named_parameters()}
    grads = []
    for model in (backprop, net):
        params = {n: t.detach().requires_grad_() for n, t in new.items()}
        out = torch.func.functional_call(model, params, (x,))
        out.square().sum().backward()
        grads.append({n: t.grad for n, t in params.items()})
        assert all(p.grad is None for p in model.parameters())
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-9, atol=1e-12, msg=name)


class Stateful(nn.Module):
    """Mutates buffers in its forward, in place and by reassignment, and reads them."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("scale", torch.ones(8))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        self.scale.mul_(1.5)  # in place
        self.calls = self.calls + 1  # reassigned
        return torch.tanh(self.lin(x)) * self.scale * self.calls


@pytest.mark.parametrize("exact", [False, True])
def test_buffers_seen_as_the_forward_saw_them(exact: bool) -> None:
    net = MomentumNet([Stateful() for _ in range(3)], 0.9, exact=exact).double()
    backprop, free, _ = twins(net)
    for _ in range(2):  # the second step starts from the first's buffers
        x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
        errors = assert_gradients_match(backprop, free, x, rtol=1e-9)
        assert errors["buffer.0.scale"] == 0.0
        assert errors["buffer.2.calls"] == 0.0
    assert int(free[0].calls) == 2


def test_train_eval_switched_before_backward() -> None:
    """The recomputation runs in the forward's modes (dropout, batch statistics), as the graph of
    backprop does; the modules stay as the caller left them."""
    net = MomentumNet([MLP(dropout=0.3, bn=True) for _ in range(4)], 0.9).double()
    backprop, free, _ = twins(net)
    x = torch.randn(8, 8, dtype=torch.float64)
    grads = []
    for model in (backprop, free):
        torch.manual_seed(3)
        out = model(x)
        model.eval()
        out.square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
        assert not any(m.training for m in model.modules())
    for g, want in zip(*grads, strict=True):
        torch.testing.assert_close(g, want, rtol=1e-9, atol=1e-12)


def test_spectral_norm_blocks() -> None:
    """spectral_norm's power iteration updates u and v in place in every forward."""
    blocks = [nn.Sequential(nn.utils.spectral_norm(nn.Linear(8, 8)), nn.Tanh()) for _ in range(4)]
    net = MomentumNet(blocks, 0.9).double()
    backprop, free, _ = twins(net)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    assert_gradients_match(backprop, free, x, rtol=1e-9)


class TiedWithin(nn.Module):
    """One weight under two names (``a.weight`` and ``b.weight``), and a parametrized one."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.c = nn.utils.parametrizations.weight_norm(nn.Linear(8, 8))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x))))))


@pytest.mark.parametrize("exact", [False, True])
def test_weights_tied_within_a_block_and_parametrized(exact: bool) -> None:
    """The recomputation binds the forward's tensors wherever the block holds them: under a
    second name, and under a parametrization (weight_norm's ``original0`` and ``original1``)."""
    net = MomentumNet([TiedWithin() for _ in range(3)], 0.9, exact=exact).double()
    backprop, free, _ = twins(net)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    errors = assert_gradients_match(backprop, free, x, rtol=1e-9)
    assert "grad.0.a.weight" in errors
    assert "grad.0.c.parametrizations.weight.original1" in errors
    assert free[0].a.weight is free[0].b.weight  # the module is as it was


def test_parameter_hooks_fire_once_per_backward() -> None:
    """A hook on a parameter sees its gradient once, as in backprop: the recomputation
    differentiates with respect to leaves of its own, not the parameters."""
    net = MomentumNet([MLP() for _ in range(3)], 0.9).double()
    backprop, free, _ = twins(net)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    for model in (backprop, free):
        seen: list[Tensor] = []
        model[1].net[0].weight.register_hook(lambda g, seen=seen: seen.append(g))
        model(x).square().sum().backward()
        assert len(seen) == 1
        torch.testing.assert_close(seen[0], model[1].net[0].weight.grad, rtol=0, atol=0)


class Noisy(nn.Module):
    """Draws from a generator of its own, as noise-injection blocks do."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: Tensor) -> Tensor:
        keep = torch.bernoulli(torch.full_like(x, 0.7), generator=self.generator)
        noise = torch.randn(x.shape, generator=self.generator, dtype=x.dtype)
        return torch.tanh(self.lin(x * keep)) + 0.1 * noise


@pytest.mark.parametrize("exact", [False, True])
def test_private_generators_are_replayed(exact: bool) -> None:
    """A block's own generator is replayed in the recomputation and left where the forward left
    it (it was wrong by 83% before: nothing replayed it)."""
    net = MomentumNet([Noisy(seed) for seed in range(4)], 0.9, exact=exact).double()
    backprop, free, _ = twins(net)
    for _ in range(2):
        x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
        assert_gradients_match(backprop, free, x, rtol=1e-9)
    for a, b in zip(backprop, free, strict=True):
        assert torch.equal(a.generator.get_state(), b.generator.get_state())


class GradSensitive(nn.Module):
    """Computes otherwise when autograd records or when its input requires grad, as attention
    backends and fused fast paths choose their kernels."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.tanh(self.lin(x))
        if torch.is_grad_enabled() and x.requires_grad:
            return out
        return out * (1 + 1e-3)


def test_forward_runs_as_the_recomputation() -> None:
    net = MomentumNet([GradSensitive() for _ in range(4)], 0.9, exact=True).double()
    backprop, free, _ = twins(net)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    free.check_inversion = "raise"
    assert_gradients_match(backprop, free, x, rtol=1e-9)


def test_transformer_encoder_in_eval_mode() -> None:
    """nn.TransformerEncoderLayer takes a fused fast path without autograd; the forward now
    records, as the recomputation does, so exact mode rebuilds its input."""
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
    from inertia import transform_to_momentumnet

    free = transform_to_momentumnet(encoder, "layers", keep_first_layer=False, exact=True).eval()
    backprop = backprop_twin(free)
    x = torch.randn(2, 5, 16, requires_grad=True)
    assert_gradients_match(backprop, free, x)


def test_saved_tensor_hooks_do_not_see_the_forwards_own_graph() -> None:
    """The forward evaluates each block with autograd recording but keeps nothing: a caller's
    saved-tensor hooks (offloading, say) see only what the nodes save."""
    net = MomentumNet([MLP(32, 64) for _ in range(8)], 0.9, use_backprop=False)
    seen: list[tuple[int, ...]] = []

    def pack(t: Tensor) -> Any:
        seen.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(torch.randn(16, 32, requires_grad=True))
    activations = [s for s in seen if s in ((16, 64),)]
    assert not activations
    out.sum().backward()


def test_unknown_order_is_refused() -> None:
    """A node reached without the state of the node above it is an error, not a wrong result."""
    net = MomentumNet([MLP() for _ in range(3)], 0.9, use_backprop=False)
    out = net(torch.randn(4, 8, requires_grad=True))
    node = out.grad_fn
    assert node is not None
    below = node.next_functions[0][0]
    assert below is not None
    with torch.no_grad(), pytest.raises(InertiaError, match="without the state from the block"):
        below.apply(torch.ones(4, 8), torch.ones(4, 8))
