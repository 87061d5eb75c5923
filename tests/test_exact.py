"""Exact mode: fixed-point momentum whose inverse rebuilds every activation bit for bit.

Round trips are checked on the integers (``==``, never a tolerance). Gradients use
`inertia.testing.TOLERANCES` against the ``use_backprop=True, exact=True`` twin, and 1e-6 against
plain float64 autograd, at depth 1000 where the float memory-free mode is hopeless.
"""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from conftest import MLP
from inertia import InertiaError, InversionError, MomentumNet, transform_to_momentumnet
from inertia._core import exact as inertia_exact
from inertia._core import kernels as inertia_kernels
from inertia._core.exact import (
    ExactArithmetic,
    Word,
    _schedule,
    bits_per_element,
    rational_gamma,
)
from inertia._core.kernels import (
    _checksum_chunked,
    _Compiled,
    _step,
    _step_push,
    _unstep_position,
    _unstep_velocity,
    _unstep_velocity_pop,
    checksum,
    step,
    step_push,
    unstep_velocity,
    unstep_velocity_pop,
)
from inertia.testing import (
    SavedTensorMeter,
    assert_gradients_match,
    backprop_twin,
    gradient_errors,
    relative_error,
)

GAMMAS = [0.01, 0.1, 1 / 3, 0.5, 0.9, 0.99, 0.999, 0.123456, 1.0]


class Wave(nn.Module):
    """A cheap elementwise block, ``tanh(a x + b)``, for very deep stacks."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(()))
        self.b = nn.Parameter(torch.randn(()))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.a * x + self.b)


def roundtrip(arith: ExactArithmetic, x: Tensor, fs: list[Tensor]) -> None:
    """Run the update over the given block outputs and back; assert every integer came back."""
    start = arith.encode(x, None)
    state = start
    for n, f in enumerate(fs):
        state = arith.step(state, f, n)
    arith.check_range()
    assert len(state) - 5 == len(arith.pushes)  # one word plane per scheduled push
    for n in reversed(range(len(fs))):
        state = arith.unstep_position(state, n)
        state = arith.unstep_velocity(state, fs[n], n)
    assert len(state) == 5  # every plane popped
    assert torch.equal(state[2], start[2])
    assert torch.equal(state[3], start[3])
    assert not state[4].any()  # the buffer is empty again


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    depth=st.integers(1, 400),
    gamma=st.sampled_from(GAMMAS),
    shape=st.lists(st.integers(1, 5), min_size=0, max_size=3),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
    magnitude=st.sampled_from([0.0, 1e-9, 1e-3, 1.0, 100.0, 3e4]),
    seed=st.integers(0, 2**31 - 1),
)
def test_roundtrip_is_bit_exact(
    depth: int, gamma: float, shape: list[int], dtype: torch.dtype, magnitude: float, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * magnitude).clamp(-6e4, 6e4).to(dtype)
    # Block outputs of both signs, zeros included, that do not depend on x: the arithmetic must
    # invert whatever it is given.
    fs = [
        (torch.randn(shape, generator=gen) * magnitude).clamp(-1e4, 1e4).to(dtype)
        * (torch.rand(shape, generator=gen) > 0.1)
        for _ in range(depth)
    ]
    roundtrip(ExactArithmetic(gamma, 32 if dtype != torch.float64 else 40, depth), x, fs)


def test_depth_10000_roundtrip_through_the_module() -> None:
    depth = 10_000
    net = MomentumNet([Wave() for _ in range(depth)], gamma=0.5, exact=True).eval()
    x = torch.randn(2, 3)
    with torch.no_grad():
        state = net(x, return_state=True)
        fresh = MomentumNet([Wave() for _ in range(depth)], gamma=0.5, exact=True)
        fresh.load_state_dict(net.state_dict())  # nothing is cached on the module
        start = fresh.inverse(state)
    assert len(state.words) == len(ExactArithmetic(0.5, 32, depth).pushes) > 300
    bits = state.fraction_bits  # the grid follows each row's scale
    assert bits.shape == (2, 1)
    assert torch.equal(start.x.long(), torch.round(x * 2.0**bits).long())
    assert torch.equal(start.v, torch.zeros_like(start.v))
    assert not start.buffer.any()
    assert start.words == ()
    assert ((start.position - x).abs() <= 2.0 ** -(bits + 1)).all()  # half a grid step


@pytest.mark.parametrize("gamma", [0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradients_at_depth_1000(gamma: float, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    depth = 1000
    blocks = [MLP(d=4, h=8) for _ in range(depth)]
    free = MomentumNet(blocks, gamma, use_backprop=False, exact=True, check_inversion="raise")
    free = free.to(dtype)
    twin = copy.deepcopy(free)
    twin.use_backprop = True
    x = torch.randn(3, 4, dtype=dtype, requires_grad=True)
    assert_gradients_match(twin, free, x)  # TOLERANCES[dtype]
    if dtype == torch.float64:
        # The grid is fine: plain float64 autograd (no rounding at all) agrees to 1e-6.
        plain = copy.deepcopy(twin)
        plain.exact = False
        assert max(gradient_errors(plain, free, x).values()) < 1e-6
        # ...where the float memory-free mode is hopeless (gamma**-1000 >= 1e301).
        floating = copy.deepcopy(plain)
        floating.use_backprop, floating.check_inversion = False, None
        errors = gradient_errors(plain, floating, x).values()
        assert not all(e < 1e-2 for e in errors)
        floating.check_inversion = "raise"
        with pytest.raises(InversionError, match="Use exact=True"):
            floating(x).sum().backward()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dropout_and_batchnorm_match_the_twin(dtype: torch.dtype) -> None:
    blocks = [MLP(dropout=0.2, bn=True) for _ in range(12)]
    net = MomentumNet(blocks, 0.9, use_backprop=False, exact=True).to(dtype)
    twin = copy.deepcopy(net)
    twin.use_backprop = True
    x = torch.randn(6, 8, dtype=dtype, requires_grad=True)
    errors = assert_gradients_match(twin, net, x, seed=3, steps=2)
    assert any(k.startswith("buffer.") for k in errors)


def test_buffer_growth_follows_log2_one_over_gamma() -> None:
    for gamma in (0.01, 0.1, 0.5, 0.9, 0.99):
        lost = math.log2(1 / gamma)
        for depth in (1000, 10_000):
            bits = bits_per_element(gamma, depth)
            # 64 bits of int64 buffer plus planes that hold at most the bits destroyed.
            assert bits <= depth * lost + 64 + 1e-6
            assert bits >= depth * lost + 64 - 51 - 32  # and no word plane wasted
    # The module's state has exactly the predicted planes.
    net = MomentumNet([Wave() for _ in range(700)], gamma=0.9, exact=True)
    state = net(torch.randn(4, 5), return_state=True)
    assert state.buffer_bits_per_element == bits_per_element(0.9, 700)
    assert state.nbytes == 4 * 5 * state.buffer_bits_per_element // 8


def test_out_of_range_values_raise_before_any_result() -> None:
    net = MomentumNet([nn.Linear(3, 3, bias=False) for _ in range(3)], gamma=0.9, exact=True)
    for magnitude in (2.0**30, 2.0**80, 2.0**-80):  # the grid follows the input's scale
        assert net(torch.full((2, 3), magnitude)).isfinite().all()
    net.fraction_bits = 32  # a fixed grid
    with pytest.raises(InertiaError, match="the input does not fit the fixed-point range"):
        net(torch.full((2, 3), 2.0**30))

    class Blow(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x * 1e13

    # Beyond the int32 word (7 bits above the input's scale) the forward runs again on a grid
    # that moves, then, beyond what one layer's update holds on it (2**50 grid steps), in
    # int64; beyond int64's 2**61 it raises.
    blocks = [nn.Identity(), Blow(), nn.Identity()]
    deep = MomentumNet(blocks, gamma=0.5, use_backprop=False, exact=True)
    with pytest.raises(InertiaError, match=r"output of block 1 .*2\*\*37 times its row"):
        deep(torch.ones(2, 3, requires_grad=True))
    assert deep.word.overflows == 2


@pytest.mark.parametrize("scale", [1e-9, 1e-3, 1e3])
def test_precision_is_relative_to_the_input(scale: float) -> None:
    """The grid follows the input's scale: bias-free blocks on activations of 1e-9 are as
    accurate as at 1 (an absolute grid of 2**-32 left them 56% off), in the forward, the
    gradients, and the inverse (bit for bit)."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(8, 8, bias=False), nn.Tanh()) for _ in range(6)]
    float_net = MomentumNet(blocks, 0.9)
    net = MomentumNet(blocks, 0.9, use_backprop=False, exact=True)
    x = (scale * torch.randn(5, 8)).requires_grad_()
    want, got = float_net(x), net(x)
    assert relative_error(got, want) <= 1e-6
    twin = copy.deepcopy(net)
    twin.use_backprop = True
    assert_gradients_match(twin, net, x)
    state = net(x, return_state=True)
    rows = x.detach().abs().amax(1)
    bits = [[24 - math.frexp(float(r))[1]] for r in rows]  # each row's largest: 24 bits
    assert torch.equal(state.fraction_bits, torch.tensor(bits, dtype=torch.int32))
    start = net.inverse(state)
    assert torch.equal(start.x, net[:0](x, return_state=True).x)
    # A fixed grid is still there for those who ask: fraction_bits=32 loses the small input.
    fixed = MomentumNet(blocks, 0.9, use_backprop=False, exact=True, fraction_bits=32)
    assert fixed(x, return_state=True).fraction_bits == 32
    if scale < 1e-6:
        assert relative_error(fixed(x), want) > 1e-2


class Grow(nn.Module):
    """``f(x) = factor * x``: a stack whose values grow."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor


class Shift(nn.Module):
    """``f(x)`` = the sample's largest magnitude: every row, a quiet one too, gains values of its
    sample's scale."""

    def forward(self, x: Tensor) -> Tensor:
        return x.abs().amax(dim=(1, 2), keepdim=True).expand_as(x)


def test_range_is_relative_to_each_row() -> None:
    """Each row (a sample's channel or token) has a grid of its own, placed at the stack's input:
    its largest value takes 24 bits (float32), unless it is more than 16 times below its sample's
    largest; then the row has the grid of a 16-times-quieter one, with room for values of the
    sample's scale. No sample's grid depends on another's. Values may grow to 2**37 times the
    row's scale (in int64), wherever it lies."""
    sample = [[1.0, 0.5, -0.3], [0.1, -0.05, 0.02], [1e-9, 0.0, 3e-10], [0.0, 0.0, 0.0]]
    x = torch.tensor([sample, [[v * 1e-6 for v in row] for row in sample]])
    net = MomentumNet([Shift()], 0.5, use_backprop=False, exact=True)
    state = net(x.requires_grad_(), return_state=True)
    # frexp exponents: 1 for the first row, -3 for the second; the floor 1 - 4 for the others. The
    # second sample, 1e-6 (2**-20 and a little) times the first, has its own grids.
    assert state.fraction_bits.flatten().tolist() == [23, 27, 27, 27, 43, 47, 47, 47]
    assert state.x.dtype == torch.int32  # the quiet rows held their sample's scale in the word
    assert net.word.overflows == 0
    assert torch.equal(state.position[0, 3], torch.full((3,), 0.5))
    assert torch.equal(state.position[1, 3], torch.full((3,), 0.5e-6))
    # Growth: 2**37 times each row's scale, for rows far apart in scale.
    y = torch.tensor([[1e-6, -3e-7, 2e-6], [1e3, 5e2, -2e3]]).requires_grad_()
    assert MomentumNet([Grow(1e7)], 0.5, use_backprop=False, exact=True)(y).isfinite().all()
    with pytest.raises(InertiaError, match=r"output of block 0 .*2\*\*37 times its row"):
        MomentumNet([Grow(1e13)], 0.5, use_backprop=False, exact=True)(y)


@pytest.mark.parametrize("shape", [(3, 4), (3, 2, 4)])
def test_a_quiet_sample_beside_loud_ones_keeps_its_precision(shape: tuple[int, ...]) -> None:
    """Samples 1e6 apart, and a sample's tokens within 16 times of each other: each as close to
    the float64 forward as float32 rounding allows: 2.6e-7 and less (a grid placed by the whole
    batch put the quiet sample 5.0e-2 off; the int64 words of before, 8.1e-4)."""
    torch.manual_seed(0)
    x = torch.randn(shape) * torch.tensor([1e3, 1e-3, 1.0]).reshape(3, *[1] * (len(shape) - 1))
    x = x.requires_grad_()
    blocks = [nn.Sequential(nn.Linear(4, 4, bias=False), nn.Tanh()) for _ in range(4)]
    exact = MomentumNet(blocks, 0.9, use_backprop=False, exact=True)
    want = MomentumNet(copy.deepcopy(blocks), 0.9).double()(x.double())
    got = exact(x)
    for n in range(3):
        assert relative_error(got[n].double(), want[n]) < 1e-6


@pytest.mark.parametrize(("factor", "word"), [(50.0, "fixed"), (1e4, "moving"), (1e8, "int64")])
def test_values_that_leave_the_int32_word_run_again(factor: float, word: str) -> None:
    """x and v live in int32 words, on the grid placed at the stack's input. A forward whose
    values leave them runs again on a grid that moves (the buffer in int32 words then), and, where
    that cannot hold them either (here: 1e8 times the input, more bits than the buffer has room
    for), in int64 on the input's grid. The BatchNorm statistics are updated once and dropout
    draws the same mask: the gradients are the backprop twin's (which computes in int64 on the
    input's grid), bit for bit unless the grid moved, and `Word` counts the reruns."""
    torch.manual_seed(0)
    blocks = [MLP(d=8, dropout=0.2, bn=True), Grow(factor), MLP(d=8, bn=True)]
    net = MomentumNet(blocks, 0.5, use_backprop=False, exact=True)
    x = torch.randn(6, 8, requires_grad=True)
    saved: list[torch.dtype] = []

    def pack(t: Tensor) -> Tensor:
        if t.shape == x.shape and not t.is_floating_point():
            saved.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x)
    overflows = {"fixed": 0, "moving": 1, "int64": 2}[word]
    assert net.word.overflows == overflows
    assert net.word.moving == (word != "fixed")
    wide = torch.int64 if word == "int64" else torch.int32
    assert net.word.dtype == wide
    buffer = torch.int32 if word == "moving" else torch.uint8  # the one-byte buffer otherwise
    # x (in an int32 word: the output's float and an int8 correction), v and the buffer.
    assert saved[:3] == [torch.int8 if word != "int64" else wide, wide, buffer]
    net.word.dtype = torch.int32  # try the narrow word again: the moving grid first
    twin = backprop_twin(net)
    errors = assert_gradients_match(twin, net, x, seed=3, steps=2)
    assert any(k.startswith("buffer.") for k in errors)
    if word == "moving":  # the grid moved: it rounds elsewhere than the input's grid
        assert max(errors.values()) > 0
    else:
        assert all(e == 0 for e in errors.values())
    assert net.word.overflows == overflows + (word == "int64")  # and then stayed there


@pytest.mark.parametrize(
    ("dtype", "scale", "splits"),
    [
        (torch.float32, 1.0, True),
        (torch.float32, 1e-36, False),  # grid steps below 2**-126: subnormal floats
        (torch.float32, 1e37, False),  # grid steps above 2**96: float32's largest in reach
        (torch.bfloat16, 1.0, False),  # 8 bits of mantissa: no one-byte correction
        (torch.float64, 1.0, False),  # int64 words
    ],
)
def test_backward_holds_x_as_a_float_and_an_int8_correction(
    dtype: torch.dtype, scale: float, splits: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A float32 stack keeps x_N as its output and an int8 correction, and its backward holds x
    so at every block (the block's float input and a correction), not in its int32 word: values
    grown 50 times past float32's 24 bits need corrections, and the gradients are still the
    twin's bit for bit (the inverse is checked at block 0). Where the float cannot carry x within
    a byte (grid steps out of float32's normal range, 16-bit floats, int64 words), x keeps its
    word, with the same gradients."""
    largest: list[int] = []
    unstep = inertia_exact.unstep_split

    def recording(position: Tensor, correction: Tensor, *rest: Tensor) -> Tensor:
        new: Tensor = unstep(position, correction, *rest)
        largest.append(int(correction.abs().max()))
        return new

    monkeypatch.setattr(inertia_exact, "unstep_split", recording)
    torch.manual_seed(0)
    # Bias-free blocks keep tiny and huge inputs' scale; float32 holds 1e37 grown twice.
    blocks = [Grow(50.0 if scale == 1.0 else 2.0)]
    blocks += [nn.Sequential(nn.Linear(8, 8, bias=False), nn.Tanh()) for _ in range(3)]
    net = MomentumNet(blocks, 0.5, use_backprop=False, exact=True).to(dtype)
    x = (torch.randn(6, 8) * scale).to(dtype).requires_grad_()
    errors = gradient_errors(backprop_twin(net), net, x, seed=3)
    assert all(e == 0 for e in errors.values()), errors
    assert net.word.overflows == 0
    assert len(largest) == (4 if splits else 0)  # to x_3, ..., x_0 (x_4 kept so by the forward)
    if splits:
        assert 0 < max(largest) <= 64


class Overflow(nn.Module):
    """Returns inf in one element while ``on``, as an fp16 block does when activations overflow."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = MLP(d=4)
        self.on = False

    def forward(self, x: Tensor) -> Tensor:
        out = self.mlp(x)
        if self.on:
            out = out.clone()
            out[0, 0] = math.inf
        return out


@pytest.mark.parametrize("use_backprop", [False, True])
@pytest.mark.parametrize("source", ["input", "block"])
def test_nonfinite_values_propagate(source: str, use_backprop: bool) -> None:
    """A NaN or inf in the forward (the input, or a block's output) gives a NaN output and NaN
    gradients, with no error, as GradScaler expects of a step to skip."""
    net = MomentumNet([Overflow() for _ in range(4)], 0.9, use_backprop=use_backprop, exact=True)
    x = torch.randn(3, 4, requires_grad=True)
    if source == "input":
        x = x.detach().clone()
        x[1, 2] = math.nan
        x.requires_grad_()
    else:
        net[2].on = True
    out = net(x)
    assert out.isnan().all()
    out.sum().backward()
    assert x.grad is not None
    assert x.grad.isnan().all()
    assert all(p.grad is not None and p.grad.isnan().all() for p in net.parameters())
    with pytest.raises(InertiaError, match="NaN or inf"):
        net(x, return_state=True)
    # The next forward is finite again and trains as before.
    net[2].on = False
    net.zero_grad()
    y = torch.randn(3, 4)
    net(y).sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in net.parameters())


def test_float_mode_nonfinite_forward_is_not_drift() -> None:
    """Float arithmetic carries NaN itself; its drift check does not call that drift."""
    net = MomentumNet([MLP(d=4) for _ in range(4)], 0.9, use_backprop=False)
    net.check_inversion = "raise"
    x = torch.randn(3, 4)
    x[0, 0] = math.inf
    net(x).sum().backward()
    assert any(p.grad is not None and not p.grad.isfinite().all() for p in net.parameters())


def test_grad_scaler_skips_the_nonfinite_step() -> None:
    """fp16-style training with a GradScaler: the step whose forward overflowed is skipped (the
    weights do not move, the scale halves), and training goes on as backprop's does."""
    torch.manual_seed(0)
    net = MomentumNet([Overflow() for _ in range(4)], 0.9, use_backprop=False, exact=True)
    twin = copy.deepcopy(net)
    twin.use_backprop = True
    runs = []
    for model in (net, twin):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        scales = []
        for i in range(3):
            model[1].on = i == 1
            opt.zero_grad()
            before = [p.detach().clone() for p in model.parameters()]
            scaler.scale(
                model(torch.randn(3, 4, generator=torch.Generator().manual_seed(i))).square().mean()
            ).backward()
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
            moved = any(
                not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True)
            )
            assert moved == (i != 1)
        runs.append((scales, [p.detach() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0] == [2.0**10, 2.0**9, 2.0**9]
    for p, q in zip(runs[0][1], runs[1][1], strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


class Counter(nn.Module):
    """Not deterministic: its output changes with every call."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.lin(x) + 1e-7 * self.calls


def test_detector_fires_on_a_nondeterministic_block() -> None:
    net = MomentumNet([MLP(d=4), Counter(), MLP(d=4)], 0.9, use_backprop=False, exact=True)
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(InversionError, match="not rebuild the forward's input bit for bit"):
        net(x).sum().backward()
    # The same stack of deterministic blocks passes.
    net = MomentumNet([MLP(d=4) for _ in range(3)], 0.9, use_backprop=False, exact=True)
    net(x).sum().backward()


@pytest.mark.parametrize("gamma", [0.5 + 1e-9, 0.899999999, math.pi / 4, 1e-12, 1 - 1e-12])
def test_any_gamma_snaps_to_a_rational(gamma: float) -> None:
    """Any gamma in (0, 1) is taken as its closest p/q (q <= 2**24), strictly inside (0, 1), and
    used throughout: the twin computes with it too, and the inverse is bit-exact."""
    ratio = rational_gamma(gamma)
    assert 0 < ratio < 1
    assert ratio.denominator <= 2**24
    assert abs(float(ratio) - gamma) <= 2**-24
    net = MomentumNet([MLP(d=4) for _ in range(6)], gamma, use_backprop=False, exact=True)
    net = net.double()
    backprop = copy.deepcopy(net)
    backprop.use_backprop = True
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert_gradients_match(backprop, net, x)
    state = net(x, return_state=True)
    start = net.inverse(state)
    assert torch.equal(start.x, net[:0](x, return_state=True).x)
    assert not start.buffer.any()


def test_six_decimals_are_exact() -> None:
    assert rational_gamma(0.9) == rational_gamma(0.9000000000000001) == Fraction(9, 10)
    assert rational_gamma(0.123456) == Fraction(123456, 10**6)
    assert rational_gamma(0.0) == 0
    assert rational_gamma(1.0) == 1


def test_no_integer_kernels_where_autograd_does_not_record(monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluation (no_grad, inference_mode, frozen weights) runs the float update with exact
    mode's gamma; return_state=True still gives the fixed-point state."""
    gamma = 0.5 + 1e-9
    net = MomentumNet([MLP(d=4) for _ in range(5)], gamma, use_backprop=False, exact=True)
    plain = MomentumNet(copy.deepcopy(list(net)), float(rational_gamma(gamma)))
    x = torch.randn(3, 4)
    state = net(x, return_state=True)
    with torch.no_grad():
        want = plain(x)

    def refuse(*args: object) -> None:
        raise AssertionError("an integer kernel ran")

    monkeypatch.setattr(ExactArithmetic, "step", refuse)
    with torch.no_grad():
        assert torch.equal(net(x), want)
    with torch.inference_mode():
        assert torch.equal(net(x), want)
    frozen = copy.deepcopy(net).requires_grad_(False)
    assert torch.equal(frozen(x), want)
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(net(x, return_state=True).x, state.x)


def test_devices_without_float64_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exact mode converts through float64, which Apple's MPS lacks: a clear error (the CPU
    stands in for such a device here)."""
    monkeypatch.setattr(inertia_exact, "_NO_FLOAT64", frozenset({"cpu"}))
    net = MomentumNet([MLP(d=4)], 0.9, use_backprop=False, exact=True)
    with pytest.raises(InertiaError, match=r"float64.*exact=False"):
        net(torch.randn(2, 4))


def test_state_and_inverse_api() -> None:
    net = MomentumNet([MLP(d=4) for _ in range(5)], gamma=0.9, exact=True)
    x = torch.randn(3, 4)
    state = net(x, return_state=True)
    assert state.x.dtype == torch.int32  # the values fitted the word
    assert state.position.dtype == torch.float32
    assert torch.equal(state.position, net(x))
    with pytest.raises(ValueError, match="other depth"):
        net[:3].inverse(
            MomentumNet([Wave() for _ in range(400)], 0.9, exact=True)(x, return_state=True)
        )
    with pytest.raises(ValueError, match="gamma=99/100"):
        MomentumNet([MLP(d=4) for _ in range(5)], 0.99, exact=True).inverse(state)
    with pytest.raises(TypeError, match="ExactState"):
        net.inverse(state.position, state.velocity)
    with pytest.raises(ValueError, match="needs exact mode"):
        MomentumNet([MLP(d=4)], 0.9)(x, return_state=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_grid_values_are_the_integers_floats(dtype: torch.dtype) -> None:
    """The forward's first input, read off the rounding in float64, is bit for bit what the
    backward rebuilds from the integers (`to_float`): signed zeros and magnitudes past 2**53
    grid steps included."""
    arith = ExactArithmetic(0.9, 32, 1, relative=False)
    x = torch.tensor([-1e-12, -0.0, 0.0, 3e-10, -2.5, 1.0 + 2**-20, 2.0**26, -(2.0**28) + 1])
    x = torch.cat([x, torch.randn(1000) * 1e3]).to(dtype)
    ints, value = arith._to_grid(x, arith._place(x), "the input")
    expected = arith._to_float(ints, dtype)
    assert torch.equal(value, expected)
    assert torch.equal(torch.signbit(value), torch.signbit(expected))  # no -0.0 where 0.0 is
    assert int(ints.abs().max()) > 2**53  # past float64's integers: still equal


def test_inverse_leaves_the_state_it_is_given() -> None:
    """The kernels update integers in place: inverse works on copies of the caller's state."""
    net = MomentumNet([MLP(d=64) for _ in range(3)], gamma=0.9, exact=True).eval()
    state = net(torch.randn(80, 64), return_state=True)  # 5,120 elements: compiled kernels
    before = [t.clone() for t in (state.x, state.v, state.buffer)]
    first, again = net.inverse(state), net.inverse(state)
    for t, b in zip((state.x, state.v, state.buffer), before, strict=True):
        assert torch.equal(t, b)
    assert torch.equal(first.x, again.x)
    assert torch.equal(first.v, again.v)


@pytest.mark.parametrize("n", [100, 5_000])  # eager and compiled kernels
def test_integer_update_is_in_place(n: int) -> None:
    """A layer's update and its inverse write x, v and the buffer where they are: the only
    tensor of the state's size that they allocate is the next block's float input."""
    arith = ExactArithmetic(0.9, 32, 3)
    state = arith.encode(torch.randn(n), None)
    where = [t.data_ptr() for t in state[2:5]]
    fs = [torch.randn(n) for _ in range(3)]
    for i, f in enumerate(fs):
        state = arith.step(state, f, i)
        assert [t.data_ptr() for t in state[2:5]] == where
    for i in reversed(range(3)):
        state = arith.unstep_velocity(arith.unstep_position(state, i), fs[i], i)
        assert [t.data_ptr() for t in state[2:5]] == where
    assert not state[4].any()


def test_backward_writes_into_the_saved_integers_unless_the_graph_is_kept() -> None:
    """The last node's backward walks on the saved x (its output's int8 correction) and v
    themselves (no copy of the state's size) when nothing reads them again, and never writes into
    the output; under retain_graph it copies them, and the caller of ``return_state=True`` gets
    integers of its own."""
    torch.manual_seed(0)
    # Values grown past float32's 24 bits: x_N's correction is not zero (x_0's is).
    net = MomentumNet([Grow(50.0), *[MLP() for _ in range(3)]], 0.9, use_backprop=False)
    x = torch.randn(16, 8, requires_grad=True)
    saved: list[tuple[Tensor, Tensor]] = []
    floats: list[tuple[Tensor, Tensor]] = []

    def pack(t: Tensor) -> Tensor:
        if t.shape == x.shape and t.dtype in (torch.int8, torch.int32):  # x's correction, v
            saved.append((t, t.clone()))
        elif t.shape == x.shape:
            floats.append((t, t.clone()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(x)
    assert [t.dtype for t, _ in saved] == [torch.int8, torch.int32]
    saved += [f for f in floats if f[0].data_ptr() == out.data_ptr()]  # x_N: the output
    assert len(saved) == 3
    assert saved[0][0].any()
    out.sum().backward(retain_graph=True)
    assert all(torch.equal(t, kept) for t, kept in saved)  # there for the second backward
    first = x.grad.clone()
    out.sum().backward()
    torch.testing.assert_close(x.grad, 2 * first, rtol=0, atol=0)
    assert torch.equal(*saved[2])  # the output, read only
    assert not any(torch.equal(t, kept) for t, kept in saved[:2])  # walked in place
    state = net(x, return_state=True)
    ints = (state.x, state.v, state.buffer)
    held = [t.clone() for t in ints]
    state.position.sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(ints, held, strict=True))


def test_velocity_converted_only_when_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory-free forward converts v_N from its integers only for a caller who reads it
    (return_velocity); then it equals the backprop twin's."""
    converted: list[int] = []
    to_float = ExactArithmetic._to_float

    def counting(self: ExactArithmetic, t: Tensor, dtype: torch.dtype) -> Tensor:
        converted.append(t.numel())
        return to_float(self, t, dtype)

    monkeypatch.setattr(ExactArithmetic, "_to_float", counting)
    torch.manual_seed(0)
    net = MomentumNet([MLP() for _ in range(3)], 0.9, use_backprop=False)
    x = torch.randn(16, 8, requires_grad=True)
    out = net(x)
    assert converted == []
    out.sum().backward()  # v never; x's floats come from the kernels that split x
    assert converted == []
    converted.clear()
    x_n, v_n = net(x, return_velocity=True)
    assert converted == [x.numel()]
    x_t, v_t = backprop_twin(net)(x, return_velocity=True)
    assert torch.equal(x_n, x_t)
    assert torch.equal(v_n, v_t)


def test_memory_is_flat_in_depth_and_backprop_grows() -> None:
    x = torch.randn(16, 8, requires_grad=True)
    held = {}
    for depth in (4, 64):
        for backprop in (False, True):
            net = MomentumNet([MLP() for _ in range(depth)], 0.9, exact=True)
            net.use_backprop = backprop
            with SavedTensorMeter(ignore=net.parameters()) as meter:
                out = net(x)
            held[depth, backprop] = meter.current
            out.sum().backward()
    # No word plane below about 300 blocks at 0.9; the buffer is kept in the smallest dtype that
    # its bound allows: one byte per element after 4 blocks, four after 64.
    kept = {depth: _schedule(9, 10, depth)[1] for depth in (4, 64)}
    assert (kept[4], kept[64]) == (torch.uint8, torch.int32)
    assert held[64, False] - held[4, False] == x.numel() * 3
    # x_N as the output's float and an int8 correction, v as an int32 word, the buffer, and the
    # 32-byte checksum of (x_0, v_0); no float copies.
    assert held[4, False] == x.numel() * (4 + 1 + 4 + 1) + 32
    assert held[64, True] > 10 * held[4, False]


def test_autocast_bf16_stays_bit_exact() -> None:
    """Under bf16 autocast the inverse rebuilds the input's fixed-point state bit for bit, and
    the memory-free gradients are the twin's, bit for bit (the same bf16 kernels run on the same
    values in the same order)."""
    net = MomentumNet([MLP() for _ in range(24)], 0.9, False, exact=True, check_inversion="raise")
    twin = copy.deepcopy(net)
    twin.use_backprop = True
    x = torch.randn(8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        errors = gradient_errors(twin, net, x)  # the backward's own check would raise
        state = net.eval()(x, return_state=True)
        start = net.inverse(state)
    assert max(errors.values()) == 0.0
    assert torch.equal(start.x, net[:0](x, return_state=True).x)
    assert not start.buffer.any()


def test_transform_passes_exact() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=3)
    converted = transform_to_momentumnet(model, gamma=0.9, exact=True, method="memory_free")
    assert all(converted.get_submodule(f"layer{i}").exact for i in range(1, 5))
    x = torch.randn(2, 3, 32, 32)
    twin = copy.deepcopy(converted)
    for i in range(1, 5):
        twin.get_submodule(f"layer{i}").use_backprop = True
    converted.eval(), twin.eval()
    assert_gradients_match(twin, converted, x)


@pytest.mark.parametrize("gamma", [0.1, 0.9])
def test_resnet_exact_forward_costs_no_more_than_float32_rounding(gamma: float) -> None:
    """A converted ResNet-50's exact forward (memory-free, on its per-row grid) differs from its
    plain float32 forward by at most 4x what float32 rounding itself costs there (the float32
    forward against the float64 one), the logits compared. Its stages hold 2, 3, 5 and 2
    momentum blocks."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10)
    model = transform_to_momentumnet(model, gamma=gamma, exact=False, method="memory_free")
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
    stages = [model.get_submodule(f"layer{i}") for i in range(1, 5)]
    for stage in stages:
        stage.exact = True
    exact = model(x).detach()  # autograd records: the memory-free exact forward
    assert all(stage.exact and not stage.use_backprop for stage in stages)
    with torch.no_grad():
        truth = model.double()(x.double())
    rounding = relative_error(plain.double(), truth)
    assert 0 < rounding < 1e-4
    assert relative_error(exact.double(), plain.double()) <= 4 * rounding


def test_compiled_and_eager_kernels_agree() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 10_000  # compiled kernels serve tensors of 4096 elements and more
    x = torch.randint(-(2**60), 2**60, (n,), generator=gen)
    v = torch.randint(-(2**60), 2**60, (n,), generator=gen)
    buffer = torch.randint(0, 2**40, (n,), generator=gen)
    f = torch.randn(n, generator=gen) * 1e3
    for p, q in [(9, 10), (1, 3), (99, 100), (16777215, 16777216), (5, 16777213)]:
        floats = ((q - p) / q * 2.0**32, 2.0**-32)
        consts = (torch.tensor(p), torch.tensor(q), *torch.tensor(floats, dtype=torch.float64))
        for push, eager_fn, compiled_fn in [(False, _step, step), (True, _step_push, step_push)]:
            # The kernels write x, v and the buffer in place: each gets its own copies.
            eager_ints = [t.clone() for t in (x, v, buffer)]
            compiled_ints = [t.clone() for t in (x, v, buffer)]
            eager = eager_fn(*eager_ints, f, *consts, torch.float32)
            compiled = compiled_fn(*compiled_ints, f, *consts, torch.float32)
            for a, b in zip([*eager_ints, *eager], [*compiled_ints, *compiled], strict=True):
                assert (a is None and b is None) or torch.equal(a, b)
            new_x, new_v, new_buffer = eager_ints
            word, _, position = eager
            # Against Python's integers, on a few elements.
            c = float(consts[2])
            for i in range(0, n, 997):
                s, k = int(buffer[i]) % p, int(buffer[i]) // p
                if push:
                    k >>= 32
                t = (int(v[i]) % q) * p + s
                expected = (int(v[i]) // q) * p + t // q + round(float(f[i].double() * c))
                assert int(new_v[i]) == expected
                assert int(new_x[i]) == int(x[i]) + expected
                assert int(new_buffer[i]) == k * q + t % q
                assert float(position[i]) == float(torch.tensor(int(new_x[i]) * 2.0**-32))
            # The inverse, given x_n: v_n, the buffer, and one step ahead x_{n-1} = x_n - v_n.
            pair = (
                [_unstep_velocity_pop, unstep_velocity_pop]
                if push
                else [_unstep_velocity, unstep_velocity]
            )
            for fn in pair:
                back = [t.clone() for t in (new_x, new_v, new_buffer)]
                fn(*back, f, *consts[:3], *([word] if push else []))
                assert torch.equal(back[1], v)
                assert torch.equal(back[2], buffer)
                assert torch.equal(back[0], new_x - v)
    # The inversion check's checksum: compiled (one reduction), chunked (eager) and Python's
    # integers agree, over several chunks.
    x, v = (torch.randint(-(2**61), 2**61, (300_000,), generator=gen) for _ in "xv")
    compiled_sums, chunked = checksum(x, v), _checksum_chunked(x, v)
    assert torch.equal(compiled_sums, chunked)
    expected = [f(t) for t in (x.tolist(), v.tolist()) for f in (_low_sum, _high_sum)]
    assert compiled_sums.tolist() == expected


def test_chunked_eager_kernels_agree_with_the_compiled_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Eagerly (no compiler, or under a dispatch mode), the kernels work chunk by chunk, rows and
    columns cut across chunks, per-row constants included: the same integers and floats as the
    compiled kernels, written into the same tensors."""
    monkeypatch.setattr(inertia_kernels, "CHUNK", 1000)
    gen = torch.Generator().manual_seed(1)
    rows, inner = 7, 1500  # chunks within a row, and rows that do not divide evenly
    x = torch.randint(-(2**30), 2**30, (rows, inner), generator=gen, dtype=torch.int32)
    v = torch.randint(-(2**30), 2**30, (rows, inner), generator=gen, dtype=torch.int32)
    buffer = torch.randint(0, 200, (rows, inner), generator=gen, dtype=torch.uint8)
    f = torch.randn(rows, inner, generator=gen)
    bits = torch.arange(rows, dtype=torch.float64).reshape(rows, 1) + 10
    scale, inv = 2.0**bits, 2.0**-bits
    p, q = torch.tensor(9), torch.tensor(10)
    c = scale * 0.1
    kernels = inertia_kernels
    pairs = [
        (kernels.step, kernels.step.fallback, (f, p, q, c, inv, torch.float32)),
        (kernels.unstep_velocity, kernels.unstep_velocity.fallback, (f, p, q, c)),
    ]
    for compiled, chunked, rest in pairs:
        a, b = [t.clone() for t in (x, v, buffer)], [t.clone() for t in (x, v, buffer)]
        out_a, out_b = compiled(*a, *rest), chunked(*b, *rest)
        for s, t in zip([*a, *pytree_leaves(out_a)], [*b, *pytree_leaves(out_b)], strict=True):
            assert torch.equal(s, t)
    for compiled, chunked, args in [
        (kernels.unstep_position, kernels.unstep_position.fallback, (x, v, inv, torch.float32)),
        (kernels.convert, kernels.convert.fallback, (x, inv, torch.float32)),
        (
            kernels.round_to_grid,
            kernels.round_to_grid.fallback,
            (f, scale, inv, 2.0**31 - 1, torch.int32),
        ),
    ]:
        a, b = [t.clone() if isinstance(t, Tensor) else t for t in args], list(args)
        b = [t.clone() if isinstance(t, Tensor) else t for t in b]
        for s, t in zip(pytree_leaves(compiled(*a)), pytree_leaves(chunked(*b)), strict=True):
            assert torch.equal(s, t)


@pytest.mark.parametrize(
    ("p", "q"),
    [(9, 10), (1, 3), (99, 100), (999, 1000), (1929, 15625), (1, 2**19), (2**19 - 1, 2**19)],
)
def test_narrow_kernels_are_the_int64_kernels(
    p: int, q: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """For int32 words and q <= 2**19, the update and its inverse in float64 arithmetic give the
    int64 kernels' integers, floats and largest magnitude, saturation and the wrap below block 0
    included, compiled and chunk by chunk, over the whole int32 range and per-row grids."""
    monkeypatch.setattr(inertia_kernels, "CHUNK", 3000)
    kernels = inertia_kernels
    gen = torch.Generator().manual_seed(p)
    shape = (3, 5000)
    limit = 2**31 - 1
    x, v = (torch.randint(-limit, limit, shape, generator=gen).int() for _ in "xv")
    bound = (2**50 if q > 2**12 else 2**15) // q
    buffer = torch.randint(0, bound, shape, generator=gen).to(
        torch.int64 if q > 2**12 else torch.int16
    )
    f = torch.randn(shape, generator=gen) * 100
    bits = torch.tensor([[20.0], [5.0], [25.0]], dtype=torch.float64)
    consts = (torch.tensor(p), torch.tensor(q), 2.0**bits * ((q - p) / q), 2.0**-bits)
    wide = [t.clone() for t in (x, v, buffer)]
    want = kernels.step(*wide, f, *consts, torch.float32)
    for narrow in (kernels.step_narrow, kernels.step_narrow.fallback):
        got_ints = [t.clone() for t in (x, v, buffer)]
        got = narrow(*got_ints, f, *consts, torch.float32)
        assert all(torch.equal(a, b) for a, b in zip(got_ints, wide, strict=True))
        assert got[0] is None
        assert torch.equal(got[1], want[1])
        assert torch.equal(got[2], want[2])
    # The inverse, from the forward's integers (where it saturated, there is no forward state).
    kept = (wide[0].abs() < limit) & (wide[1].abs() < limit)
    back = [t.clone() for t in wide]
    kernels.unstep_velocity(*back, f, *consts[:3])
    for narrow in (kernels.unstep_velocity_narrow, kernels.unstep_velocity_narrow.fallback):
        got_ints = [t.clone() for t in wide]
        narrow(*got_ints, f, *consts[:3])
        assert all(torch.equal(a[kept], b[kept]) for a, b in zip(got_ints, back, strict=True))
        assert torch.equal(got_ints[1][kept], v[kept])  # v_n again
        assert torch.equal(got_ints[2][kept], buffer[kept])  # and the buffer


def pytree_leaves(out: object) -> list[Tensor]:
    """The tensors of a kernel's result (a tensor, or a tuple with None among them)."""
    items = out if isinstance(out, tuple) else (out,)
    return [t for t in items if t is not None]


def test_a_dispatch_mode_runs_the_kernels_eagerly_without_disabling_them() -> None:
    """Under a Python dispatch mode (an operation counter, a memory tracker), which dynamo does
    not trace, the kernels run eagerly for that call, with no warning, and compile again after
    it (a failed compilation there used to turn them eager for the rest of the process)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.calls += 1
            return func(*args, **(kwargs or {}))

    net = MomentumNet([MLP(64, 64) for _ in range(3)], 0.9, use_backprop=False)
    x = torch.randn(128, 64, requires_grad=True)  # 8,192 elements: compiled kernels
    with Count() as count:
        net(x).sum().backward()
    assert count.calls > 100
    assert not _Compiled.failed
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net(x).sum().backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads, strict=True))


def _low_sum(values: list[int]) -> int:
    return sum(a & ((1 << 31) - 1) for a in values)


def _high_sum(values: list[int]) -> int:
    return sum(a >> 31 for a in values)


def test_compile_failure_falls_back_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(_Compiled, "failed", False)
    kernel = _Compiled(_unstep_position)
    n = 5000  # compiled kernels serve tensors of 4096 elements and more
    inv = torch.tensor(2.0**-32, dtype=torch.float64)
    x, v = torch.arange(-n, n), torch.arange(2 * n)
    expected_x = x.clone()
    expected = _unstep_position(expected_x, v, inv, torch.float32)
    with pytest.warns(RuntimeWarning, match="runs eagerly, with identical results"):
        out = kernel(x, v, inv, torch.float32)
    assert torch.equal(out, expected)
    assert torch.equal(x, expected_x)


def test_twin_records_from_a_trainable_block_after_frozen_ones() -> None:
    # Autograd starts recording mid-stack: the twin must still see the float velocity.
    net = MomentumNet([MLP() for _ in range(6)], 0.9, use_backprop=False, exact=True)
    for block in list(net)[:3]:
        block.requires_grad_(False)
    twin = copy.deepcopy(net)
    twin.use_backprop = True
    assert_gradients_match(twin, net, torch.randn(5, 8))


@pytest.mark.parametrize("exact", [False, True])
def test_empty_batch(exact: bool) -> None:
    """An empty batch trains like plain autograd: zero gradients, no reduction over nothing."""
    net = MomentumNet([MLP() for _ in range(3)], 0.9, use_backprop=False, exact=exact)
    twin = copy.deepcopy(net)
    twin.use_backprop = True
    x = torch.randn(0, 8, requires_grad=True)
    errors = assert_gradients_match(twin, net, x)
    assert errors["grad.0.net.0.weight"] == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in net.parameters())


def test_strided_input_is_rebuilt_bit_for_bit() -> None:
    net = MomentumNet([MLP() for _ in range(6)], 0.5, use_backprop=False, exact=True)
    net.check_inversion = "raise"
    twin = copy.deepcopy(net)
    twin.use_backprop = True
    x = torch.randn(8, 16).t()  # not contiguous
    assert not x.is_contiguous()
    assert_gradients_match(twin, net, x.requires_grad_(), rtol=1e-6)


def test_exact_by_default_when_memory_free() -> None:
    """exact=None resolves at each forward: exact where the backward is memory-free (and gamma >
    0), float otherwise; True and False pin it; slices and backprop twins keep what it was."""
    from inertia import transform_to_momentumnet

    net = MomentumNet([MLP() for _ in range(3)], 0.9)  # momentumnet's default: backprop
    assert not net.exact
    assert "exact" not in repr(net)
    net.use_backprop = False  # as momentumnet's users switch
    assert net.exact
    x = torch.randn(4, 8, requires_grad=True)
    assert net(x, return_state=True).x.dtype == torch.int32
    assert net[1:].exact
    twin = backprop_twin(net)
    assert isinstance(twin, MomentumNet)
    assert twin.use_backprop
    assert twin.exact
    net.exact = False
    assert not net.exact
    assert "exact=False" in repr(net)
    with pytest.raises(ValueError, match="needs exact mode"):
        net(x, return_state=True)
    net.exact = None
    assert net.exact
    with pytest.warns(UserWarning, match="dividing by gamma"):
        net.gamma = 0.0  # gamma 0 trains with backprop: nothing to invert, float
    assert not net.exact
    with pytest.raises(TypeError, match="True, False or None"):
        MomentumNet([MLP()], 0.9, exact=1)  # type: ignore[arg-type]
    model = nn.Sequential(nn.Sequential(MLP(), MLP(), MLP()))
    stacks = [
        transform_to_momentumnet(model, "0", gamma=0.9, exact=e, method="memory_free")[0]
        for e in (None, False)
    ]
    assert [s.exact for s in stacks] == [True, False]


def test_rounding_onto_the_grid_makes_no_float64_copy_of_the_input(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The input goes onto the grid in one compiled pass, or, eagerly (here: under a dispatch
    mode), chunk by chunk: no float64 tensor of its size is made, and the result is the one-pass
    rounding's (the test fails with the chunk as large as the input)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.float64 = 0  # the most elements of a float64 tensor made

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                    self.float64 = max(self.float64, t.numel())
            return out

    monkeypatch.setattr(inertia_kernels, "CHUNK", 1000)
    x = torch.randn(50, 170) * 3
    x[3, 7] = -0.0
    arith = ExactArithmetic(0.9, 24, depth=1, relative=True, word=Word())
    with Largest() as mode:
        ints, values = arith._to_grid(x, arith._place(x), "the input")
    assert mode.float64 <= 1000 < x.numel()
    assert arith.grid is not None
    expected = (x.double() * arith.grid.scale).round().add(0.0)
    assert ints.dtype == torch.int32
    assert torch.equal(ints, expected.int())
    assert torch.equal(values, (expected * arith.grid.inv).float())
    bits = [[24 - math.frexp(float(r))[1]] for r in x.abs().amax(1)]
    assert torch.equal(arith.grid.bits, torch.tensor(bits, dtype=torch.int32))
