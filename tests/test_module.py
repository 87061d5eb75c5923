"""MomentumNet as an nn.Module: containers, state_dict, copies, modes, inverse, compatibility."""

from __future__ import annotations

import copy
import gc
import io

import pytest
import torch
from torch import nn

import inertia._core.chain
from conftest import MLP, twins
from inertia import InertiaError, MomentumNet, from_momentumnet_state_dict
from inertia.testing import relative_error


@pytest.mark.parametrize("container", [list, nn.ModuleList, lambda b: nn.Sequential(*b)])
def test_blocks_are_children_like_sequential(container: object) -> None:
    blocks = [MLP() for _ in range(3)]
    net = MomentumNet(container(blocks), 0.9)  # type: ignore[operator]
    assert len(net) == 3
    assert list(net) == blocks
    assert net[0] is blocks[0]
    assert net[-1] is blocks[2]
    assert [name for name, _ in net.named_children()] == ["0", "1", "2"]
    assert net.functions == blocks
    with pytest.raises(IndexError, match="out of range"):
        net[3]
    head = net[:2]
    assert isinstance(head, MomentumNet)
    assert list(head) == blocks[:2]
    assert head.gamma == 0.9


def test_state_dict_keys_identical_across_modes() -> None:
    net = MomentumNet([MLP(bn=True) for _ in range(3)], 0.9)
    backprop, free, _ = twins(net)
    assert list(backprop.state_dict()) == list(free.state_dict())
    assert next(iter(free.state_dict())) == "0.net.0.weight"
    free.load_state_dict(backprop.state_dict(), strict=True)


@pytest.mark.parametrize("exact", [False, True])
def test_no_tensor_kept_between_calls(exact: bool) -> None:
    """After a step, no tensor of the stack's shape is alive anywhere (module, blocks, caches of
    the arithmetic, autograd nodes kept by a reference cycle), and no attribute was added."""
    net = MomentumNet([MLP() for _ in range(3)], 0.9, use_backprop=False, exact=exact)
    before = {k: v for k, v in vars(net).items() if k != "_modules"}
    shape = (7, 8)

    def alive() -> int:
        gc.collect()
        # type(), not isinstance(): the latter reads __class__, which some objects warn about.
        return sum(1 for o in gc.get_objects() if type(o) is torch.Tensor and o.shape[:1] == (7,))

    already = alive()  # other tests' tensors of that shape, if any are still referenced
    for _ in range(2):
        net(torch.randn(shape)).sum().backward()
    assert alive() == already
    out = net(torch.randn(shape))  # the probe sees a tensor of that shape when one is kept
    assert alive() > already
    del out
    after = {k: v for k, v in vars(net).items() if k != "_modules"}
    assert before.keys() == after.keys()
    assert list(net.state_dict()) == list(MomentumNet([MLP() for _ in range(3)], 0.9).state_dict())


def test_deepcopy_and_pickle() -> None:
    net = MomentumNet([MLP() for _ in range(3)], 0.9, use_backprop=False)
    x = torch.randn(2, 8)
    clone = copy.deepcopy(net)
    assert torch.equal(clone(x), net(x))
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x), net(x))
    assert loaded.use_backprop is False


def test_train_eval_propagate() -> None:
    net = MomentumNet([MLP(dropout=0.5) for _ in range(3)], 0.9, use_backprop=False)
    net.eval()
    assert not net[0].net[2].training
    x = torch.randn(4, 8)
    assert torch.equal(net(x), net(x))  # dropout off
    net.train()
    assert net[0].net[2].training


@pytest.mark.parametrize("use_backprop", [True, False])
def test_inverse_round_trip(use_backprop: bool) -> None:
    init = nn.Linear(8, 8)
    net = MomentumNet(
        [MLP() for _ in range(10)],
        0.9,
        init_speed=True,
        init_function=init,
        use_backprop=use_backprop,
        exact=False,  # the float inverse of (x_N, v_N); exact mode inverts an ExactState
    ).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    x_n, v_n = net(x, return_velocity=True)
    x0, v0 = net.inverse(x_n, v_n)
    assert relative_error(x0, x) < 1e-12
    assert relative_error(v0, init(x)) < 1e-12


def test_no_grad_costs_nothing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under no_grad and inference_mode the memory-free path is the plain loop: no Function."""
    net = MomentumNet([MLP() for _ in range(3)], 0.9, use_backprop=False)
    x = torch.randn(2, 8, requires_grad=True)
    expected = MomentumNet(list(net), 0.9)(x)

    def forbidden(*args: object) -> None:
        raise AssertionError("the custom Function ran")

    monkeypatch.setattr(inertia._core.chain._Start, "apply", forbidden)
    with torch.no_grad():
        assert torch.equal(net(x), expected)
    with torch.inference_mode():
        assert torch.equal(net(x), expected)
    with pytest.raises(AssertionError, match="Function ran"):
        net(x)


def test_gamma_zero_backprop_is_resnet() -> None:
    blocks = [MLP() for _ in range(4)]
    x = torch.randn(3, 8)
    expected = x
    for b in blocks:
        expected = expected + b(expected)
    assert torch.equal(MomentumNet(blocks, 0.0)(x), expected)


def test_gamma_one_warns() -> None:
    with pytest.warns(UserWarning, match="inert"):
        MomentumNet([MLP()], 1.0)


def test_repr_names_settings() -> None:
    assert "gamma=0.9, use_backprop=False" in repr(MomentumNet([MLP()], 0.9, use_backprop=False))


@pytest.mark.parametrize("keep_first_layer", [True, False])
def test_from_momentumnet_transformed_resnet(keep_first_layer: bool) -> None:
    """A ResNet converted by momentumnet's own transform_to_momentumnet, saved, loads into
    inertia's conversion of the same ResNet (strict) and computes the same outputs."""
    momentumnet = pytest.importorskip("momentumnet")
    resnet18 = pytest.importorskip("torchvision.models").resnet18
    from inertia import transform_to_momentumnet

    # Without keep_first_layer, only layer1 keeps its shape through its first block.
    layers = ["layer1", "layer2", "layer3", "layer4"] if keep_first_layer else ["layer1"]
    torch.manual_seed(0)
    old = momentumnet.transform_to_momentumnet(resnet18(num_classes=10), layers, keep_first_layer)
    new = transform_to_momentumnet(resnet18(num_classes=10), layers, keep_first_layer)
    new.load_state_dict(from_momentumnet_state_dict(old.state_dict(), layers, keep_first_layer))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(new.eval()(images), old.eval()(images))
    with pytest.raises(InertiaError, match="check sub_layers and keep_first_layer"):
        from_momentumnet_state_dict(old.state_dict(), layers, not keep_first_layer)


def test_from_momentumnet_state_dict() -> None:
    """A state_dict with momentumnet 0.10's keys (``network.N.*``, ``network.init.*``) loads."""
    init = nn.Linear(8, 8)
    net = MomentumNet([MLP() for _ in range(2)], 0.9, init_speed=True, init_function=init)
    old = {f"network.{k}": v for k, v in net.state_dict().items()}
    assert "network.init.weight" in old
    fresh = MomentumNet(
        [MLP() for _ in range(2)], 0.9, init_speed=True, init_function=nn.Linear(8, 8)
    )
    fresh.load_state_dict(from_momentumnet_state_dict(old), strict=True)
    x = torch.randn(3, 8)
    assert torch.equal(fresh(x), net(x))
    nested = from_momentumnet_state_dict({"layer1.network.0.conv.weight": 1, "network.x": 2})
    assert nested == {"layer1.0.conv.weight": 1, "network.x": 2}


def test_hooks_fire_again_in_recomputation() -> None:
    """Documented: forward hooks on blocks run once in forward and once more in backward."""
    net = MomentumNet([MLP() for _ in range(3)], 0.9, use_backprop=False)
    calls: list[int] = []
    for i, block in enumerate(net):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    out = net(torch.randn(2, 8, requires_grad=True))
    assert calls == [0, 1, 2]
    out.sum().backward()
    assert calls == [0, 1, 2, 2, 1, 0]


@pytest.mark.parametrize("use_backprop", [True, False])
def test_each_block_runs_once_forward_once_backward(use_backprop: bool) -> None:
    counts = [[0, 0] for _ in range(4)]  # [forward, backward-time] calls per block

    class Counting(MLP):
        def __init__(self, i: int) -> None:
            super().__init__()
            self.i = i

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            counts[self.i][int(torch.is_grad_enabled() and in_backward)] += 1
            return super().forward(x)

    in_backward = False
    net = MomentumNet([Counting(i) for i in range(4)], 0.9, use_backprop=use_backprop)
    out = net(torch.randn(2, 8, requires_grad=True))
    assert counts == [[1, 0]] * 4
    in_backward = True
    out.sum().backward()
    assert counts == ([[1, 0]] * 4 if use_backprop else [[1, 1]] * 4)


def test_keep_first_runs_leading_blocks_as_layers() -> None:
    widen = nn.Linear(4, 8)
    blocks = [widen, MLP(), MLP()]
    net = MomentumNet(blocks, 0.9, keep_first=1).double()
    assert len(net) == 3
    assert net[0] is widen
    assert "keep_first=1" in repr(net)
    x = torch.randn(3, 4, dtype=torch.float64)
    h = widen(x)
    v = torch.zeros_like(h)
    for block in blocks[1:]:
        v = 0.9 * v + (1 - 0.9) * block(h)
        h = h + v
    assert torch.equal(net(x), h)
    x_n, v_n = net(x, return_velocity=True)
    x0, _ = net.inverse(x_n, v_n)  # the momentum part only: back to widen(x)
    assert relative_error(x0, widen(x)) < 1e-12
    tail = net[1:]
    assert tail.keep_first == 0
    assert list(tail) == blocks[1:]
    assert net[:2].keep_first == 1
    with pytest.raises(ValueError, match="keep_first=4"):
        MomentumNet(blocks, 0.9, keep_first=4)


def test_the_fused_update_has_a_double_backward() -> None:
    """With use_backprop=True the update is one compiled node (2**16 elements and more), whose
    backward autograd records under create_graph: second derivatives are the eager loop's."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(64, 64), nn.Tanh()) for _ in range(3)]
    net = MomentumNet(blocks, 0.9, use_backprop=True, is_residual=False).double()
    x = torch.randn(1024, 64, dtype=torch.float64, requires_grad=True)

    def eager_loop(x: torch.Tensor) -> torch.Tensor:
        v = torch.zeros_like(x)
        for block in blocks:
            v = 0.9 * v + (1 - 0.9) * (block(x) - x)
            x = x + v
        return x

    second = []
    for run in (eager_loop, net):
        (g,) = torch.autograd.grad(run(x).pow(3).sum(), x, create_graph=True)
        assert g.requires_grad
        second.append(torch.autograd.grad(g.square().sum(), [x, *net.parameters()]))
    for a, b in zip(*second, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("is_residual", [True, False])
@pytest.mark.parametrize("init_speed", [False, True])
def test_the_update_is_the_eager_loop_bit_for_bit(
    dtype: torch.dtype, is_residual: bool, init_speed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU, the update runs as one compiled pass per block (tensors of `2**16` elements and
    more): without autograd writing each new v into the last; where autograd records, as one node
    whose backward is one compiled pass too. Outputs and gradients are those of the update written
    as a plain loop, to the last bit, whichever of x and v the loss uses."""
    from inertia._core import arith

    calls: list[str] = []
    for name in ("momentum_update", "momentum_update_", "momentum_pullback"):
        kernel = getattr(arith, name)
        monkeypatch.setattr(
            arith, name, lambda *a, _k=kernel, _n=name: (calls.append(_n), _k(*a))[1]
        )
    init = nn.Linear(64, 64) if init_speed else None
    blocks = [nn.Sequential(nn.Linear(64, 64), nn.Tanh()) for _ in range(4)]
    net = MomentumNet(
        blocks, 0.9, init_speed=init_speed, init_function=init, is_residual=is_residual
    ).to(dtype)
    x = torch.randn(1024, 64, dtype=dtype, requires_grad=True)  # 2**16 elements: compiled

    def eager_loop(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = init(x) if init is not None else torch.zeros_like(x)
        for block in blocks:
            f = block(x) if is_residual else block(x) - x
            v = 0.9 * v + (1 - 0.9) * f
            x = x + v
        return x, v

    losses = {
        "both": lambda x, v: x.square().sum() + v.sum(),
        "x": lambda x, v: x.square().sum(),
        "v": lambda x, v: v.square().sum(),  # the last node's x' unused
    }
    for name, loss in losses.items():
        grads = []
        for run in (eager_loop, lambda x: net(x, return_velocity=True)):
            out = run(x)
            loss(*out).backward()
            grads.append([x.grad, *(p.grad for p in net.parameters())])
            x.grad = None
            net.zero_grad()
        for a, b in zip(*grads, strict=True):
            assert (a is None) == (b is None), name
            assert a is None or torch.equal(a, b), name
    assert calls.count("momentum_update") == 3 * 4  # each block, for each loss
    assert calls.count("momentum_pullback") == 3 * 4  # each block, for each loss
    assert "momentum_update_" not in calls
    calls.clear()
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            got = net(x, return_velocity=True)
        for a, b in zip(got, out, strict=True):
            assert torch.equal(a, b)
            assert a.is_contiguous()
    assert calls.count("momentum_update_") == 2 * 3  # the first block allocates v, no others
    assert calls.count("momentum_update") == 2
