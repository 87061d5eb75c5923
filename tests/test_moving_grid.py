"""Exact mode's moving grid: int32 words whose rows move to coarser grids where their values grow,
with the dropped bits kept in the buffer (`inertia.Word.moving`)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from conftest import MLP
from inertia import MomentumNet
from inertia._core import exact as inertia_exact
from inertia._core import kernels
from inertia.testing import assert_gradients_match, gradient_errors, relative_error


class Amplify(nn.Module):
    """``f(x) = factor x`` on the first row (a sample, or a sample's first token), 0 elsewhere: one
    row grows, the others do not."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        mask = torch.zeros_like(x)
        mask[(slice(None),) * (x.dim() - 2) + (0,)] = self.factor
        return x * mask


def _amplified(d: int = 8, factor: float = 3e3) -> list[nn.Module]:
    return [MLP(d=d, bn=True), Amplify(factor), MLP(d=d, dropout=0.2, bn=True), Amplify(5.0)]


@pytest.mark.parametrize(
    ("p", "q"), [(9, 10), (1, 2), (99, 100), (1929, 15625), (1, 2**19), (2**19 - 1, 2**19)]
)
def test_moving_kernels_shift_rows_and_invert(
    p: int, q: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each row's new x and v are shifted by the fewest bits k that bring them within 2**30 steps,
    the k low bits of each pushed onto the buffer (rows with k = 0 get the fixed grid's integers);
    the inverse pops them, gives back x_n, v_n and the buffer, and moves x one step ahead through
    the shift of the layer below, read from the buffer; so with x held as its float32 and an int8
    correction. Compiled and chunk by chunk (rows longer than a chunk) alike, against the int64
    kernels and Python's integers."""
    monkeypatch.setattr(kernels, "CHUNK", 3000)
    gen = torch.Generator().manual_seed(q)
    shape = (4, 5000)
    x, v = (torch.randint(-(2**28), 2**28, shape, generator=gen) for _ in "xv")
    below = torch.tensor([[0], [1], [0], [1]])  # the shift of the layer below, per row
    m_below = 2**below
    # The buffer below: its own digits, then the low bits that the layer below dropped.
    top = max(1, 2**31 // (q // p + 2) // 2**8 // 4)  # the buffer stays below 2**31
    dx, dv = (torch.randint(0, 2**20, shape, generator=gen) % m_below for _ in "xv")
    buffer = (torch.randint(0, top, shape, generator=gen) * m_below + dx) * m_below + dv
    f = torch.randn(shape, generator=gen).clamp(-3, 3).float()
    c = torch.tensor([[0.5], [2.0**29], [2.0**30], [2.0**31]], dtype=torch.float64)
    inv = torch.tensor([[2.0**-20], [2.0**-5], [2.0**3], [2.0**-40]], dtype=torch.float64)
    pq = (torch.tensor(p), torch.tensor(q))
    wide = [t.clone() for t in (x, v, buffer)]  # int64 words: the fixed grid's update, whole
    largest = kernels.step(*wide, f, *pq, c, inv, torch.float32)[1]
    rows = torch.maximum(wide[0].abs(), wide[1].abs()).amax(1, keepdim=True)
    k = torch.tensor([[max(0, int(r).bit_length() - 30)] for r in rows])
    assert k[0] == 0
    assert k[3] > k[1] > 0
    m = 2**k
    dropped = [t & (m - 1) for t in wide[:2]]
    want = [wide[0] >> k, wide[1] >> k, (wide[2] * m + dropped[0]) * m + dropped[1]]
    assert all(t.abs().max() <= 2**30 for t in want[:2])
    assert want[2].max() < 2**31
    position = (want[0].double() * (inv * m)).float()
    results = []
    for kernel in (kernels.step_moving, kernels.step_moving.fallback):
        ints = [t.int() for t in (x, v, buffer)]
        got_largest, got_position, got_k = kernel(*ints, f, *pq, c, inv, torch.float32)
        assert all(torch.equal(a.long(), b) for a, b in zip(ints, want, strict=True))
        assert torch.equal(got_k, k.double())
        assert torch.equal(got_position, position)
        assert torch.equal(got_largest, largest)
        results.append(ints)
    # The inverse: x_n from x_{n+1} and v_{n+1}, then v_n and the buffer, then x_{n-1} ahead.
    md, mb = m.double(), m_below.double()
    for position_kernel, velocity_kernel in [
        (kernels.unstep_position_moving, kernels.unstep_velocity_moving),
        (kernels.unstep_position_moving.fallback, kernels.unstep_velocity_moving.fallback),
    ]:
        ints = [t.clone() for t in results[0]]
        back = position_kernel(*ints, md, inv, torch.float32)
        assert torch.equal(ints[0].long(), x)
        assert torch.equal(back, (x.double() * inv).float())
        velocity_kernel(*ints, f, *pq, c, md, mb)
        assert torch.equal(ints[1].long(), v)
        assert torch.equal(ints[2].long(), buffer)
        assert torch.equal(ints[0].long(), (x - v) * m_below + dx - dv)
    # With x held as its float32 and an int8 correction, on the grid after the shift.
    scale = 1 / inv
    above = (results[0][0].double() * (inv * md)).float()
    correction = kernels.correction(results[0][0], above, scale / md)
    for split_kernel, velocity_kernel in [
        (kernels.unstep_split_moving, kernels.unstep_velocity_only_moving),
        (kernels.unstep_split_moving.fallback, kernels.unstep_velocity_only_moving.fallback),
    ]:
        ints, fixed = [t.clone() for t in results[0]], correction.clone()
        back = split_kernel(above, fixed, ints[1], ints[2], md, scale, inv)
        assert torch.equal(back, (x.double() * inv).float())
        assert torch.equal((back.double() * scale).long() + fixed, x)
        velocity_kernel(ints[1], ints[2], f, *pq, c, md)
        assert torch.equal(ints[1].long(), v)
        assert torch.equal(ints[2].long(), buffer)


def test_a_growing_row_moves_alone_and_trains_like_autograd() -> None:
    """A row (here a sample) that grows more than 2**7 times its input's scale leaves the int32
    word on the input's grid: the forward runs again on a grid that moves, where that row alone
    moves. Outputs,
    every gradient and the BatchNorm statistics are plain float32 autograd's within float32's
    tolerance, the inversion checks out bit for bit at block 0, and the word stays int32."""
    torch.manual_seed(0)
    blocks = _amplified()
    net = MomentumNet(copy.deepcopy(blocks), 0.9, use_backprop=False, exact=True)
    net.check_inversion = "raise"
    plain = MomentumNet(copy.deepcopy(blocks), 0.9, exact=False)
    x = torch.randn(6, 8, requires_grad=True)
    errors = assert_gradients_match(plain, net, x, seed=3, steps=2)
    assert any(k.startswith("buffer.") for k in errors)
    assert (net.word.dtype, net.word.moving, net.word.overflows) == (torch.int32, True, 1)
    state = net(x, return_state=True)
    assert state.shifts is not None
    moved = state.shifts.long().sum(0).flatten()
    assert moved[0] > 0
    assert not moved[1:].any()
    assert (state.x.dtype, state.v.dtype, state.buffer.dtype) == (torch.int32,) * 3
    # The same stack in float64: int64 words, which hold it on the input's grid.
    wide = MomentumNet(copy.deepcopy(blocks), 0.9, use_backprop=False, exact=True).double()
    reference = MomentumNet(copy.deepcopy(blocks), 0.9, exact=False).double()
    assert_gradients_match(reference, wide, x.detach().double().requires_grad_(), seed=3)
    assert wide(x.double(), return_state=True).shifts is None


def test_a_moving_grid_keeps_precision_where_its_rows_grow() -> None:
    """A sample's first token grows some 2**12 times past its input's scale; the others do not.
    The rows that stay keep the integers of the input's grid (the int64 twin's, bit for bit); the
    row that moves keeps 30 bits at its largest magnitude as it grows, so its output is as close
    to the float64 forward as the int64 words on the input's grid, and within 4 times float32's
    own rounding."""
    torch.manual_seed(0)
    blocks = [MLP(d=16), Amplify(300.0), MLP(d=16), Amplify(300.0), MLP(d=16)]
    x = torch.randn(2, 5, 16) * torch.tensor([1.0, 0.5, 4.0, 1.0, 2.0]).reshape(1, 5, 1)
    want = MomentumNet(copy.deepcopy(blocks), 0.9, exact=False).double()(x.double())
    own = MomentumNet(copy.deepcopy(blocks), 0.9, exact=False)(x)
    moving = MomentumNet(copy.deepcopy(blocks), 0.9, use_backprop=False, exact=True)
    got = moving(x.requires_grad_()).detach()
    assert moving.word.moving
    assert moving.word.dtype == torch.int32
    shifts = moving(x, return_state=True).shifts
    assert shifts is not None
    assert shifts[:, :, 0].sum() > 0
    assert not shifts[:, :, 1:].any()
    twin = MomentumNet(copy.deepcopy(blocks), 0.9, use_backprop=True, exact=True)
    fixed = twin(x).detach()  # int64 words on the input's grid
    assert torch.equal(got[:, 1:], fixed[:, 1:])
    error = relative_error(got[:, 0], want[:, 0])
    assert error <= 4 * relative_error(own[:, 0], want[:, 0])
    assert error <= 2 * relative_error(fixed[:, 0], want[:, 0])


def test_a_moving_state_keeps_nine_bytes_beside_its_output_and_inverts() -> None:
    """On a moving grid the memory-free stack keeps, beside its output (x_N's float), x_N's int8
    correction and v and the buffer in int32 words (9 bytes per element, against 16 + 1 for
    int64 words, which keep x_N's word), and a shift record of one byte per row and block. Its
    `ExactState` inverts to the input's bit for bit, a stack of another depth refuses it, and a
    second backward (retain_graph) walks the same grids again."""
    torch.manual_seed(0)
    blocks = _amplified(d=64)
    for block in blocks:
        block.eval()  # dropout draws again in the inverse: it would not rebuild the input
    net = MomentumNet(copy.deepcopy(blocks), 0.9, use_backprop=False, exact=True)
    x = torch.randn(32, 64, requires_grad=True)
    net(x)  # the first forward overflows and reruns; the word now moves
    assert net.word.moving
    widened = copy.deepcopy(net)
    widened.word.dtype = torch.int64  # the int64 words of before
    kept = {}
    for name, model in (("moving", net), ("int64", widened)):
        saved: list[Tensor] = []

        def pack(t: Tensor) -> Tensor:
            if t.shape == x.shape and not t.is_floating_point():
                saved.append(t)  # noqa: B023 (used at once)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        kept[name] = sum(t.element_size() for t in saved)
    assert kept == {"moving": 9, "int64": 17}  # bytes per element: x, v and the buffer
    state = net(x, return_state=True)
    start = net.inverse(state)
    assert torch.equal(start.x, net[:0](x, return_state=True).x)
    with pytest.raises(ValueError, match="moved over 4 blocks"):
        net[1:].inverse(state)
    out = net(x)
    grads = torch.autograd.grad(out.sum(), x, retain_graph=True)[0]
    again = torch.autograd.grad(out.sum(), x)[0]
    assert torch.equal(grads, again)
    errors = gradient_errors(MomentumNet(copy.deepcopy(blocks), 0.9, exact=False), net, x)
    assert max(errors.values()) < 1e-5


def test_the_backward_holds_x_as_a_float_and_a_byte_on_a_moving_grid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stack keeps x_N as its float32 output and an int8 correction, and the backward holds
    x so at every block, on a moving grid too, each block's on its own grid: gradients within
    float32's tolerance of plain autograd, the inversion checked bit for bit at block 0."""
    largest: list[int] = []
    unstep = inertia_exact.unstep_split_moving

    def recording(position: Tensor, correction: Tensor, *rest: Tensor) -> Tensor:
        new: Tensor = unstep(position, correction, *rest)
        largest.append(int(correction.abs().max()))
        return new

    monkeypatch.setattr(inertia_exact, "unstep_split_moving", recording)
    torch.manual_seed(0)
    blocks = [MLP(d=8), Amplify(300.0), MLP(d=8), Amplify(300.0), MLP(d=8), MLP(d=8)]
    net = MomentumNet(copy.deepcopy(blocks), 0.9, use_backprop=False, exact=True)
    net.check_inversion = "raise"
    x = torch.randn(6, 8, requires_grad=True)
    assert_gradients_match(MomentumNet(copy.deepcopy(blocks), 0.9, exact=False), net, x)
    assert net.word.moving
    assert len(largest) == 6  # to x_5, ..., x_0 (x_6 kept so by the forward)
    assert 0 < max(largest) <= 64


class Residual(nn.Module):
    """``g(x) = x + f(x)``: a whole map, for ``is_residual=False``."""

    def __init__(self, f: nn.Module) -> None:
        super().__init__()
        self.f = f

    def forward(self, x: Tensor) -> Tensor:
        return x + self.f(x)


@pytest.mark.parametrize(
    ("gamma", "init_speed", "is_residual", "shape"),
    [
        (0.9, False, True, (4, 3, 8)),
        (0.5, True, True, (3, 8)),
        (0.99, False, False, (2, 5, 8)),
        (0.3, True, False, (6, 8)),
    ],
)
def test_moving_grids_train_like_autograd_across_modes(
    gamma: float, init_speed: bool, is_residual: bool, shape: tuple[int, ...]
) -> None:
    """On a moving grid, across gammas (their buffers' schedules), a starting velocity, blocks
    that are whole maps and 2-D and 3-D states: the gradients are the backprop twin's (int64
    words on the input's grid) within float32's tolerance, the inverse is checked bit for bit,
    and `inverse` rebuilds the input's state from the output's. Each amplifying block adds 30
    times the first row to its velocity, whatever gamma: 900 times over the two, past the int32
    word's 128 on the input's grid. (Plain float32 autograd is itself up to 3e-4 from the float64
    gradients of these stacks: they amplify rounding.)"""
    torch.manual_seed(0)
    factor = 30 / (1 - gamma)
    blocks: list[nn.Module] = [MLP(d=8), Amplify(factor), MLP(d=8), Amplify(factor), MLP(d=8)]
    if not is_residual:
        blocks = [Residual(b) for b in blocks]
    kwargs = {"is_residual": is_residual, "init_speed": init_speed}
    if init_speed:
        kwargs["init_function"] = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
    net = MomentumNet(copy.deepcopy(blocks), gamma, use_backprop=False, exact=True, **kwargs)
    net.check_inversion = "raise"
    twin = MomentumNet(copy.deepcopy(blocks), gamma, use_backprop=True, exact=True, **kwargs)
    twin.load_state_dict(net.state_dict())
    x = torch.randn(shape, requires_grad=True)
    assert_gradients_match(twin, net, x)
    assert net.word.moving
    assert net.word.dtype == torch.int32
    state = net(x, return_state=True)
    assert state.shifts is not None
    assert state.shifts.any()
    start = net.inverse(state)
    assert torch.equal(start.x, net[:0](x, return_state=True).x)
