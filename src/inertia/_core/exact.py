"""Fixed-point momentum arithmetic whose inverse is bit-exact at any depth and gamma.

``x`` and ``v`` are integers on a grid. Each block sees the float value of the fixed-point ``x``;
its contribution ``(1 - gamma) f`` is rounded onto the grid before it enters the update, so the
forward and the inverse add and subtract identical integers.

The grid follows the data: each row of the state (an index of its first two dimensions, such as a
sample's channel or a sample's token; of its first for a 2-D state) has its own step, placed at
the stack's input so that the row's largest magnitude takes ``precision`` bits (24 for float32
inputs: the step is float32's own spacing there; 40 for float64), or so that 1/16 of the largest
magnitude of the row's sample does, where that is larger. Samples of any scales, and a sample's
rows up to 16 times apart, thus each keep their precision, and no sample's grid depends on the
rest of the batch; quieter rows (a dead ReLU channel) have room for values of their sample's
scale, which a block may write into them. ``x`` and ``v``
are held in an int32 word, 4 bytes per element, which leaves the rows 7 bits (128 times) to grow
over the stack. A forward whose values leave it is detected at its end, and the memory-free
forward then runs again on a grid that moves (`Word.moving`): after each layer, a row whose new
``x`` or ``v`` passes ``2**30`` steps of its grid moves to a grid coarser by the fewest bits ``k``
that hold them, and the ``k`` low bits that each of its ``x`` and ``v`` drops go to the buffer
(int32 words then), above the gamma product's digits, so that nothing is lost and each row keeps
30 bits at its largest magnitude. The backward replays the shifts from their record (one ``k``
per row and layer). Where even that cannot hold the values (a layer's past ``2**50`` steps of
its grid, or a buffer past its int32 word), the forward runs again with int64 words on the
input's grid. Nothing wraps, and `Word` counts the reruns. float64 stacks and fixed grids
(``fraction_bits``) use int64 words, whose values stay below ``2**61``. From its forward to its
backward, a float32 stack in int32 words keeps ``x_N`` as its float32 value, the stack's output
(which the next layer keeps for its own backward anyway), and an int8 correction (`finish`), and
its backward holds each ``x_n`` so: one byte per element beside the float, where the word takes
four.

Multiplying by ``gamma = p / q`` (a rational within 1e-12 of the float gamma, usually equal to it:
0.9 is 9/10) destroys information, about ``log2(q / p)`` bits per element. Following Maclaurin,
Duvenaud and Adams (2015), the lost bits go to a per-element integer ``buffer`` and the product
takes its low digits from it, so ``v <- gamma v`` becomes a bijection of ``(v, buffer)``::

    s = buffer mod p,  buffer <- buffer // p          (p new low digits for v)
    v = a q + c  (0 <= c < q);  t = c p + s           (t < p q: no int64 overflow)
    v <- a p + t // q,  r = t mod q                   (|v - gamma v_old| < 1 + gamma grid steps)
    buffer <- buffer q + r                            (keep what the division dropped)

Division is floor division throughout, so negative values round-trip. The buffer grows by
``log2(q / p)`` bits per layer; before ``buffer * q`` could pass ``2**51`` (below which float64
holds it exactly, which the kernels of `_kernels` use to divide fast), its low 32 bits move to a
new word plane (one int32 per element). The layers at which planes are pushed depend only on
``p``, ``q`` and the layer index (the bound of every element's buffer is the same), so the inverse
knows when to pop them without storing anything, and no element needs its own stack pointer.
After ``depth`` layers the buffer takes ``64 + 32 * planes`` bits per element: the 64 bits of the
int64 buffer, and planes that hold at most ``depth * log2(1 / gamma)`` bits, the information lost.
A stack too short to push a plane (fewer than about 330 blocks at gamma 0.9) keeps its buffer in
the smallest integer dtype that holds its bound after the last layer, forward and backward (the
bound only grows with depth): one byte per element for up to 20 blocks at gamma 0.9.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import torch
from torch import Tensor

from .._errors import InertiaError, InversionError
from .arith import Check, State
from .kernels import (
    MOVING_LIMIT,
    NARROW_LIMIT,
    NARROW_Q,
    WORD,
    checksum,
    checksum_split,
    convert,
    correction,
    eager,
    power_of_two,
    round_to_grid,
    step,
    step_moving,
    step_narrow,
    step_push,
    unstep_position,
    unstep_position_moving,
    unstep_split,
    unstep_split_moving,
    unstep_velocity,
    unstep_velocity_moving,
    unstep_velocity_narrow,
    unstep_velocity_only,
    unstep_velocity_only_moving,
    unstep_velocity_pop,
)

__all__ = [
    "ExactArithmetic",
    "ExactState",
    "Word",
    "bits_per_element",
    "kept_bytes_per_element",
    "rational_gamma",
]

_MAX_DENOMINATOR = 1 << 24  # p q < 2**48, so t = c p + s never overflows
_BUFFER_CAP = 1 << 51  # the buffer stays below this (the kernels divide it exactly through float64)
_LIMIT = 1 << 61  # in int64 words, |x|, |v| and each rounded block output stay below this
_MAX_BITS = 1000  # grid steps from 2**-1000 to 2**1000: both normal float64 numbers
# Grid steps from 2**-126 (every nonzero value on the grid is a normal float32) to 2**96 (values
# below 2**31 steps stay below float32's largest): where x's int32 word splits into a float32 and
# an int8 correction (`kernels._part`).
_SPLIT_BITS = (-96, 126)
# A relative grid's row (a sample's channel or token) is at most 2**_QUIET_BITS times finer than
# its sample's loudest, so that a row whose input is quiet (a dead ReLU channel, a lone small
# value) has room in an int32 word for values up to 8 times the sample's largest input magnitude,
# where a block writes into it.
_QUIET_BITS = 4


def rational_gamma(gamma: float) -> Fraction:
    """The rational ``p / q`` (``q <= 2**24``) that exact mode uses for ``gamma``.

    It is the closest such fraction, within 6e-8 of ``gamma`` and equal to it for every gamma with
    at most six decimals (0.9 is 9/10, 0.99 is 99/100). A gamma strictly between 0 and 1 stays
    strictly between them (``1 / 2**24`` at least, ``1 - 1 / 2**24`` at most): invertible, and
    its blocks not inert. Exact mode computes with this ratio throughout: its float update and
    gradients use ``p / q``, not ``gamma``.
    """
    ratio = Fraction(gamma).limit_denominator(_MAX_DENOMINATOR)
    if 0 < gamma < 1:
        step = Fraction(1, _MAX_DENOMINATOR)
        ratio = min(max(ratio, step), 1 - step)
    return ratio


@lru_cache(maxsize=64)
def _schedule(p: int, q: int, depth: int) -> tuple[frozenset[int], torch.dtype]:
    """The layers at which the forward moves the buffer's low 32 bits to a new word plane, and the
    smallest integer dtype that holds the buffer after the last layer (what the backward keeps)."""
    bound, pushes = 0, set()  # bound: the largest value any element's buffer can hold
    for n in range(depth):
        bound //= p
        if bound * q + q - 1 >= _BUFFER_CAP:
            pushes.add(n)
            bound >>= WORD
        bound = bound * q + q - 1
    kept = next(d for d in _SAVED_DTYPES if bound <= torch.iinfo(d).max)  # the buffer is >= 0
    return frozenset(pushes), kept


_SAVED_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)


@dataclass
class Word:
    """The integer word of an exact stack's fixed-point ``x`` and ``v``, shared by its forwards
    (`MomentumNet.word`).

    Attributes:
        dtype: ``torch.int32`` (4 bytes per element) until a memory-free forward's values leave
            it even on a grid that moves; from then on ``torch.int64``, on the grid placed at the
            stack's input. Set it back to ``torch.int32`` to try again.
        overflows: How many memory-free forwards left their word and ran again (their blocks'
            buffers, such as BatchNorm's running statistics, and random generators were put
            back before the second run): on a grid that moves, or in int64.
        moving: Whether the int32 word's grid moves with the data: set by the first forward
            whose values leave the word on the grid placed at the stack's input. Each row (a
            sample's token or channel) whose values pass ``2**30`` grid steps then moves, at that
            layer, to a grid coarser by the fewest bits that hold them, and the low bits that its
            ``x`` and ``v`` drop go to the buffer (int32, 4 bytes per element instead of 1 or
            2): nothing is lost, and each row keeps 30 bits at its largest magnitude. Where the
            buffer cannot hold them, or the stack's schedule leaves it no room (word planes, or
            a ``gamma`` whose denominator passes ``2**19``), the forward runs in int64 instead.
    """

    dtype: torch.dtype = torch.int32
    overflows: int = 0
    moving: bool = False


@dataclass(frozen=True)
class ExactState:
    """The fixed-point state of an exact `MomentumNet`, from ``forward(x, return_state=True)``.

    Attributes:
        position: ``x`` as a float tensor of the input's shape and dtype (with autograd history
            when the forward recorded one).
        velocity: ``v``, likewise.
        x: ``x`` in fixed point: the value times ``2**fraction_bits``; int32 where every value of
            the forward fitted the stack's int32 word, else int64.
        v: ``v`` in fixed point, likewise.
        buffer: The information that the multiplications by gamma dropped, in the smallest
            integer dtype its bound allows (int64 where word planes were pushed).
        words: int32 planes of older buffer bits, oldest first.
        gamma: The rational gamma of the update.
        fraction_bits: int32, broadcastable to ``x``: each grid row's step is
            ``2**-fraction_bits`` (one value for a fixed grid), so ``x * 2.0**-fraction_bits`` is
            the position.
        shifts: int8, of shape ``(depth, *fraction_bits.shape)``, where the grid moved
            (`Word.moving`): the bits by which each row's step grew after each block, which the
            inverse replays. None where the grid stayed where the stack's input placed it.
    """

    position: Tensor
    velocity: Tensor
    x: Tensor
    v: Tensor
    buffer: Tensor
    words: tuple[Tensor, ...]
    gamma: Fraction
    fraction_bits: Tensor
    shifts: Tensor | None = None

    @property
    def buffer_bits_per_element(self) -> int:
        """Bits of the buffer and its word planes per element."""
        return 8 * self.buffer.element_size() + WORD * len(self.words)

    @property
    def nbytes(self) -> int:
        """Bytes of the buffer and its word planes."""
        return self.buffer.nbytes + sum(w.nbytes for w in self.words)


class _StraightThrough(torch.autograd.Function):
    """Returns ``value`` (the rounded result) with the gradient of ``ghost`` (the float one)."""

    @staticmethod
    def forward(ctx: object, ghost: Tensor, value: Tensor) -> Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class WordOverflow(Exception):
    """A memory-free forward's values left the int32 word (`ExactArithmetic.check_range`, which
    widened it): the forward runs again."""


@dataclass(frozen=True)
class _Grid:
    """Where a forward's integers sit: ``bits`` per grid row (int32, broadcastable to the state),
    and, per row, ``scale = 2**bits``, ``c = (1 - gamma) 2**bits`` and ``inv = 2**-bits``
    (float64, shape ``(rows, 1)``, or ``(1, 1)`` for one grid) for the kernels, which see the
    state as ``(rows, inner)``."""

    bits: Tensor
    scale: Tensor
    c: Tensor
    inv: Tensor
    shape: torch.Size

    @property
    def rows(self) -> int:
        return self.c.shape[0]

    def view(self, t: Tensor) -> Tensor:
        """``t`` (of the state's shape) as ``(rows, inner)``; a view where ``t`` is contiguous."""
        rows = self.rows
        return t.reshape(rows, t.numel() // rows if rows else 0)


def _row_dims(ndim: int) -> int:
    """How many leading dimensions index a grid row: two of a tensor of rank 3 or more (a
    sample's channel, a sample's token), one of a matrix, none of a vector or a scalar."""
    return 2 if ndim >= 3 else 1 if ndim == 2 else 0


class ExactArithmetic:
    """The momentum update in fixed point, with a bit-exact inverse (see the module docstring).

    A state is ``(x_float, v_float, x, v, buffer, *word_planes)``. ``step`` is exact in the
    integers; where autograd records, the float tensors carry the gradient of the float update
    (rounding passes gradients straight through), so ``use_backprop=True`` is the memory-free
    mode's twin. Where autograd does not record, ``v_float`` is an empty placeholder (`velocity`
    computes it from ``v`` if asked).

    Args:
        gamma: The momentum.
        fraction_bits: Without ``relative``, the grid step is ``2**-fraction_bits`` everywhere.
            With it, each grid row's largest input magnitude takes ``fraction_bits`` bits.
        depth: The stack's number of blocks (the buffer's schedule).
        relative: Place a grid per row at the input (see the module docstring).
        word: The stack's `Word`, for a relative grid: int32 words while it says so. None: int64.
    """

    # Pure Python set-up (a Fraction, an lru_cache'd schedule, which dynamo warns about tracing):
    # under torch.compile it runs eagerly.
    @eager
    def __init__(
        self,
        gamma: float,
        fraction_bits: int,
        depth: int,
        relative: bool = False,
        word: Word | None = None,
    ) -> None:
        self.ratio = rational_gamma(gamma)
        self.p, self.q = self.ratio.numerator, self.ratio.denominator
        self.gamma = float(self.ratio)
        self.fraction_bits = fraction_bits
        self.relative = relative
        self.depth = depth
        self.pushes, self.kept_buffer = (
            _schedule(self.p, self.q, depth) if self.p else (frozenset(), torch.int64)
        )
        self.kept_fixed = self.kept_buffer  # where the grid does not move
        # The buffer works in its kept dtype unless planes are pushed (then int64, below 2**51).
        self.buffer_dtype = self.kept_buffer if not self.pushes else torch.int64
        self.policy = word if relative else None
        narrow = self.policy is not None and self.policy.dtype == torch.int32
        self.word = torch.int32 if narrow else torch.int64
        # A grid that moves (`Word.moving`): each layer's shifts k (float64, (rows, 1)), and the
        # largest value each row's buffer can hold (float64, (rows, 1)), checked by `check_range`.
        self.moving = False
        self._moves: list[Tensor] = []
        self._bound: Tensor | None = None
        # The grids of the layers' inputs, and 2**k for each layer, for the backward.
        self._grids: list[_Grid] = []
        self._factors: list[Tensor] = []
        if narrow and self.policy is not None and self.policy.moving:
            self._move_grid()
        self._ints: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self.grid: _Grid | None = None
        # On-grid input cached by `on_grid` for `encode` (the init function sees it first).
        self._rounded: tuple[Tensor, Tensor, Tensor] | None = None
        # Largest magnitudes in grid units, checked by `check_range`: the input's and v_0's, then
        # one per layer.
        self._entries: list[tuple[str, Tensor]] = []
        self._largest: list[Tensor] = []
        self.finite = True  # what the last `check_range` found
        self._fits = False  # the last forward's values fitted an int32 word
        # v_n, from `unstep_velocity`, which moved x to x_{n-1}: for the next `unstep_position`.
        self._ahead: Tensor | None = None
        self.dtype = torch.float32  # of the floats, set by `encode`

    @property
    def limit(self) -> int:
        """Magnitudes in grid units must stay below this in the word."""
        return NARROW_LIMIT if self.word == torch.int32 else _LIMIT

    @property
    def movable(self) -> bool:
        """Whether an int32 word's grid can move: the narrow kernels serve the update (``q <=
        NARROW_Q``, no word plane), and the schedule's buffer takes at most 16 bits, which
        leaves its int32 at least 15 for the shifts' low bits."""
        small = self.kept_fixed.itemsize <= 2
        return bool(self.p) and not self.pushes and self.q <= NARROW_Q and small

    def _move_grid(self, moving: bool = True) -> None:
        """Let the int32 word's grid move (or stop it): the buffer takes int32 words."""
        self.moving = moving and self.movable
        kept = torch.int32 if self.moving else self.kept_fixed
        self.kept_buffer = kept
        self.buffer_dtype = kept if not self.pushes else torch.int64

    def widen(self, count: bool = True) -> None:
        """A memory-free forward's values left the int32 word (``count``: `Word.overflows`):
        let its grid move, where it can and does not yet, else hold ``x`` and ``v`` in int64
        words from now on, on the grid placed at the input. Without ``count`` (nothing is kept,
        no rerun): int64."""
        if count and self.word == torch.int32 and self.policy is not None:
            self.policy.overflows += 1
            if not self.moving and self.movable:
                self.policy.moving = True
                self._move_grid()
                return
            self.policy.dtype = torch.int64
        self.word = torch.int64
        self._move_grid(False)

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``p`` and ``q`` as 0-d int64 tensors (kernel arguments, so that one compiled kernel
        serves every gamma)."""
        if device not in self._ints:
            self._ints[device] = (
                torch.tensor(self.p, device=device),
                torch.tensor(self.q, device=device),
            )
        return self._ints[device]

    def _grid(self, bits: Tensor, shape: torch.Size) -> _Grid:
        """The grid of ``bits`` (int, broadcastable to ``shape``) for a state of ``shape``."""
        rows = math.prod(bits.shape)
        scale = power_of_two(bits).reshape(rows, 1)
        c = scale * ((self.q - self.p) / self.q)  # exact: times a power of two
        inv = power_of_two(-bits).reshape(rows, 1)
        return _Grid(bits.to(torch.int32), scale, c, inv, shape)

    def _set_grid(self, bits: Tensor, shape: torch.Size) -> _Grid:
        """Place the state's grid (`_grid`)."""
        self.grid = self._grid(bits, shape)
        return self.grid

    def _shift(self, k: Tensor) -> None:
        """The rows of the grid move by ``k`` bits (float64, ``(rows, 1)``) after a layer: the
        record, the buffer's bound (``p`` digits out, ``q`` in, then ``2 k`` bits in) and the
        grid."""
        grid, bound = self.grid, self._bound
        assert grid is not None
        assert bound is not None
        self._moves.append(k)
        m2 = power_of_two(2 * k)
        # Exact while it matters (below 2**31: the quotient's rounding error is below 1 / p).
        quotient = torch.div(bound, self.p, rounding_mode="floor")
        bound = (quotient * self.q + (self.q - 1)) * m2 + (m2 - 1)
        self._bound = bound.clamp(max=2.0**60)  # past the word: reported, and kept finite
        bits = grid.bits - k.reshape(grid.bits.shape).to(torch.int32)
        self._set_grid(bits, grid.shape)

    def _replay(self, final: Tensor, moves: list[Tensor]) -> None:
        """The grids and the shifts' factors ``2**k`` of a moving grid's layers, for the
        inverse, from the grid after the last layer (``final`` bits) and the shifts."""
        assert self.grid is not None
        shape = self.grid.shape
        grids = [self._grid(final, shape)]
        bits = final
        for k in reversed(moves):
            bits = bits + k.reshape(bits.shape).to(torch.int32)
            grids.append(self._grid(bits, shape))
        self._grids = grids[::-1]
        self._factors = [power_of_two(k) for k in moves]
        self.grid = self._grids[-1]

    def _place(self, t: Tensor) -> _Grid:
        """The grid for the stack's input ``t``, computed on its device (no sync)."""
        if not self.relative:
            bits = torch.full((), self.fraction_bits, dtype=torch.int32, device=t.device)
            return self._set_grid(bits.reshape((1,) * t.dim()), t.shape)
        k = _row_dims(t.dim())
        dims = tuple(range(k, t.dim()))
        largest = torch.linalg.vector_norm(t.detach(), math.inf, dim=dims or None, keepdim=True)
        if not dims:
            largest = largest.reshape(t.shape)
        # 2**(e - 1) <= largest < 2**e: the row's largest takes `fraction_bits` bits, unless it is
        # more than 2**_QUIET_BITS below the loudest row of its sample (zero rows too), so that
        # no sample's grid depends on the others in the batch. Zero samples and zero rows of a
        # matrix (and non-finite ones, which `check_range` reports): e = 0.
        exponent = torch.frexp(largest.double())[1]
        exponent = torch.where(largest > 0, exponent, -_MAX_BITS)
        if k == 2 and exponent.numel():
            loudest = exponent.amax(dim=1, keepdim=True)  # each sample's loudest channel or token
            exponent = torch.maximum(exponent, loudest - _QUIET_BITS)
        exponent = torch.where(exponent > -_MAX_BITS, exponent, 0)
        bits = (self.fraction_bits - exponent).clamp(-_MAX_BITS, _MAX_BITS)
        return self._set_grid(bits, t.shape)

    # -- conversions ------------------------------------------------------------------------------
    def _to_grid(self, t: Tensor, grid: _Grid, what: str) -> tuple[Tensor, Tensor]:
        """Round ``t`` onto ``grid`` in one compiled pass (eagerly, chunk by chunk), with no float64
        temporary of its size and no device sync: its largest magnitude in grid units goes to
        `check_range`, which reports a value that does not fit (NaN and inf are zero here and
        make the forward non-finite). Returns the integers, contiguous (the kernels write into
        views of them), and their value as floats of ``t``'s dtype (`to_float` of the
        integers)."""
        if not t.numel():
            largest = torch.zeros((), dtype=torch.float64, device=t.device)
            ints = torch.empty(t.shape, dtype=self.word, device=t.device)
            values = torch.empty(t.shape, dtype=t.dtype, device=t.device)
        else:
            source = grid.view(t.detach())
            bound = float(self.limit)
            ints, values, largest = round_to_grid(source, grid.scale, grid.inv, bound, self.word)
            ints, values = ints.view(t.shape), values.view(t.shape)
        self._entries.append((what, largest))
        return ints, values

    def _to_float(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        assert self.grid is not None
        value: Tensor = convert(self.grid.view(t), self.grid.inv, dtype)
        return value.view(t.shape)

    def _range_error(self, what: str) -> InertiaError:
        if self.relative:
            where = (
                f"below 2**{61 - self.fraction_bits} times its row's scale at the stack's "
                "input (each sample's channel or token has a grid of its own, with "
                f"{self.fraction_bits} bits at its largest magnitude, or at 1/16 of its sample's "
                "where that is larger)"
            )
            fix = "Normalize the activations inside the blocks (a norm layer), or use exact=False"
        else:
            where = f"below 2**{61 - self.fraction_bits}, with fraction_bits={self.fraction_bits}"
            fix = "Pass a lower fraction_bits (or None, a grid that follows the data)"
        return InertiaError(
            f"exact mode: {what} does not fit the fixed-point range: magnitudes must be finite "
            f"and {where}. {fix}."
        )

    def on_grid(self, x: Tensor) -> Tensor:
        """``x`` as the blocks see it: the float value of its fixed-point rounding."""
        ints, value = self._to_grid(x, self._place(x), "the input")
        self._rounded = (x, ints, value)
        return _StraightThrough.apply(x, value) if _recording(x) else value

    def encode(self, x: Tensor, v: Tensor | None) -> State:
        _check_device(x.device)
        rounded, self._rounded = self._rounded, None
        if rounded is not None and rounded[0] is x and rounded[1].dtype == self.word:
            xi, xf = rounded[1:]
        else:
            self._entries = []
            xi, xf = self._to_grid(x, self._place(x), "the input")
        grid = self.grid
        assert grid is not None
        if v is None:
            vi, vf = torch.zeros_like(xi), torch.zeros_like(xf)
        else:
            vi, vf = self._to_grid(v, grid, "v_0 = init_function(x_0)")
        if _recording(x):
            xf = _StraightThrough.apply(x, xf)
        if v is not None and _recording(v):
            vf = _StraightThrough.apply(v, vf)
        self._largest = []
        self._moves, self._grids, self._factors = [], [], []
        if self.moving:
            self._bound = torch.zeros((grid.rows, 1), dtype=torch.float64, device=x.device)
        self.dtype = x.dtype
        return (xf, vf, xi, vi, torch.zeros(x.shape, dtype=self.buffer_dtype, device=x.device))

    def position(self, state: State) -> Tensor:
        return state[0]

    def to_exact_state(self, state: State) -> ExactState:
        """``state`` as the public `ExactState`."""
        if not self.finite:
            raise InertiaError(
                "exact mode: the forward met a NaN or inf, so it has no fixed-point state to "
                "return (its output is NaN)."
            )
        assert self.grid is not None
        xf, _, xi, vi, buffer, *words = state
        vf = self.velocity(state)
        narrow = self.policy is not None and self.policy.dtype == torch.int32 and self._fits
        if narrow and xi.dtype != torch.int32:  # values of an int64 pass that fit the word
            xi, vi = xi.to(torch.int32), vi.to(torch.int32)
        bits = self.grid.bits
        shifts = None
        if self._moves:
            moves = torch.stack([k.reshape(bits.shape) for k in self._moves])
            shifts = moves.to(torch.int8)  # at most 60 bits each
        return ExactState(xf, vf, xi, vi, buffer, tuple(words), self.ratio, bits, shifts)

    def from_exact_state(self, state: ExactState) -> State:
        """The tuple for ``state``, after checking that this stack's forward made it."""
        if state.gamma != self.ratio:
            raise ValueError(
                f"the state was made with gamma={state.gamma}, but this MomentumNet has "
                f"gamma={self.ratio}."
            )
        if not self.relative and not bool((state.fraction_bits == self.fraction_bits).all()):
            raise ValueError(
                "the state was made on another grid, but this MomentumNet has a fixed grid of "
                f"fraction_bits={self.fraction_bits}."
            )
        if len(state.words) != len(self.pushes):
            raise ValueError(
                f"the state's buffer has {len(state.words)} word planes, but a forward through "
                f"these {self.depth} blocks leaves {len(self.pushes)}; it comes from a stack of "
                "another depth."
            )
        _check_device(state.x.device)
        grid = self._set_grid(state.fraction_bits, state.x.shape)
        self._move_grid(state.shifts is not None)
        if state.shifts is not None:
            if not self.moving or len(state.shifts) != self.depth:
                raise ValueError(
                    f"the state's grid moved over {len(state.shifts)} blocks, but these "
                    f"{self.depth} blocks (gamma={self.ratio}) cannot move theirs that way; it "
                    "comes from another stack: invert it with the stack whose forward returned it."
                )
            self.word = torch.int32
            moves = [k.reshape(grid.rows, 1).double() for k in state.shifts]
            self._replay(state.fraction_bits, moves)
        self._fits = state.x.dtype == torch.int32  # the forward's values all fitted it
        dtype = state.position.dtype
        xf, vf = (self._to_float(t, dtype) for t in (state.x, state.v))
        # Copies, contiguous: the kernels write into the integers (and not into the caller's).
        contiguous = torch.contiguous_format
        ints = (t.to(self.word, copy=True, memory_format=contiguous) for t in (state.x, state.v))
        buffer = state.buffer.to(self.buffer_dtype, copy=True, memory_format=contiguous)
        self.dtype = dtype
        return (xf, vf, *ints, buffer, *state.words)

    def velocity(self, state: State) -> Tensor:
        vf, vi = state[1], state[3]
        return vf if vf.shape == vi.shape else self._to_float(vi, state[0].dtype)

    # -- the update and its inverse -------------------------------------------------------------
    # The kernels work on (rows, inner) views, so that one compiled kernel serves every shape.
    def step(self, state: State, f: Tensor, n: int) -> State:
        xf, vf, xi, vi, buffer, *words = state
        grid = self.grid
        assert grid is not None
        p, q = self._on(xi.device)
        shape, dtype = xi.shape, xf.dtype
        recording = _recording(vf, f, xf)
        # v_n's float, read before the kernel moves the integers on (a placeholder if the stack's
        # first blocks did not record).
        vf = self.velocity(state) if recording else vf
        if xi.numel() == 0:  # an empty batch: nothing moves (and no reduction over nothing)
            largest = torch.zeros((), dtype=torch.float64, device=xi.device)
            if self.moving:
                self._shift(torch.zeros((grid.rows, 1), dtype=torch.float64, device=xi.device))
            new_xf, new_vf = self._to_float(xi, dtype), self._to_float(vi, dtype)
        elif self.p == 0:  # gamma = 0: v is forgotten, there is nothing to keep (backprop only)
            scaled = grid.view(f.detach()).double() * grid.c
            new_v = scaled.round().long()
            new_x = grid.view(xi).long() + new_v
            largest = torch.stack([t.abs().amax().double() for t in (scaled, new_v, new_x)]).amax()
            xi = new_x.clamp(-self.limit, self.limit).to(self.word).view(shape)
            vi = new_v.clamp(-self.limit, self.limit).to(self.word).view(shape)
            new_xf, new_vf = self._to_float(xi, dtype), self._to_float(vi, dtype)
        else:
            views = [grid.view(t) for t in (xi, vi, buffer)]  # the state's own integers: in place
            args = (*views, grid.view(f.detach()), p, q, grid.c, grid.inv, dtype)
            if self.moving:
                largest, new_xf, k = step_moving(*args)
                self._shift(k)  # x and v are on the next layer's grid now
            else:
                kernel = step_push if n in self.pushes else step
                if kernel is step and xi.dtype == torch.int32 and self.q <= NARROW_Q:
                    kernel = step_narrow  # the same integers, in float64 arithmetic
                word, largest, new_xf = kernel(*args)
                if word is not None:
                    words.append(word.view(shape))
            new_xf = new_xf.view(shape)
            new_vf = self._to_float(vi, dtype) if recording else _LAZY
        # |(1 - gamma) f|, |v| and |x| below the word's limit at every layer keep every sum in
        # int64 (by induction). Checked once per forward by `check_range`, not with a device sync
        # per layer; the backward recomputes the same values, which the detector verifies.
        self._largest.append(largest)
        if recording:
            ghost_v = self.gamma * vf + (1 - self.gamma) * f
            new_vf = _StraightThrough.apply(ghost_v, new_vf)
            new_xf = _StraightThrough.apply(xf + new_vf, new_xf)
        return (new_xf, new_vf, xi, vi, buffer, *words)

    def step_output(self, state: State, out: Tensor, subtract: bool, n: int) -> State:
        return self.step(state, out - state[0] if subtract else out, n)

    def check_range(self) -> bool:
        """Whether the forward since `encode` stayed finite (one device sync per forward). False
        where a NaN or inf entered (the input, ``v_0`` or a block's output): the state's integers
        are then meaningless, and `poisoned` gives the state to return. Where a finite value left
        the word first: `WordOverflow` in an int32 word (the memory-free forward runs again on a
        grid that moves, or in int64, see `widen`), else an error. On a moving grid, a layer's
        values must stay below `MOVING_LIMIT` on the grid it computes on, and each row's buffer
        within its int32 word."""
        entries, self._entries = self._entries, []
        layers, self._largest = self._largest, []
        self.finite = False
        names = [what for what, _ in entries] + [
            f"the output of block {n} (or the state x or v after it)" for n in range(len(layers))
        ]
        limits = [float(self.limit)] * len(entries)
        limits += [MOVING_LIMIT if self.moving else float(self.limit)] * len(layers)
        found = [t for _, t in entries] + layers
        if self.moving and self._bound is not None and self._bound.numel():
            names.append("the buffer (the low bits that the moving grid's rows dropped)")
            limits.append(float(NARROW_LIMIT) + 1)
            found.append(self._bound.amax())
        values = torch.stack(found)
        bad = ~(values < values.new_tensor(limits))  # True for NaN too
        self._fits = bool((values < NARROW_LIMIT).all())
        if bool(bad.any()):
            n = int(bad.nonzero()[0, 0])
            if not bool(values[n].isfinite()):  # the first bad value is a NaN or inf
                return False
            if self.word == torch.int32:
                self.widen()
                raise WordOverflow(names[n])
            raise self._range_error(names[n])
        self.finite = True
        return True

    def poisoned(self, state: State) -> State:
        """``state`` with NaN floats, whose autograd history is kept, so that every gradient
        through them is NaN: what a forward that met a NaN or inf returns (``GradScaler`` then
        skips the step)."""
        xf, _, *ints = state
        vf = self.velocity(state)
        return (xf * math.nan, vf * math.nan, *ints)

    def finish(self, state: State) -> State:
        """The final state as the memory-free stack keeps it: where `_splits` allows, ``x_N`` as
        its float32 value, which is the stack's output (the next layer keeps it for its own
        backward anyway), and an int8 correction instead of its int32 word, 3 bytes per element
        fewer; the backward then holds ``x`` so at every block. The float is the last step's,
        which rounds ``x`` as `kernels._part` does (a correction past a byte would fail the
        inversion check). Else ``state``. One device sync (the grid's range)."""
        xf, xi = state[0], state[2]
        if not (self.finite and self._splits(xi)):
            return state
        grid = self.grid
        assert grid is not None
        fix = correction(grid.view(xi), grid.view(xf), grid.scale).view(xi.shape)
        return (xf, state[1], fix, *state[3:])

    def saved(self, state: State) -> State:
        """The integers: ``x`` (or, after `finish`, its float, the output, and its correction),
        ``v``, the buffer and its word planes (the floats follow). The buffer in the smallest
        dtype that its bound allows (one byte per element where fewer than 21 blocks have filled
        it at gamma 0.9; always for one block)."""
        xf, _, xi, vi, buffer, *words = state
        position = (xf,) if xi.dtype == torch.int8 else ()
        return (*position, xi, vi, buffer.to(self.kept_buffer), *words)

    def restore(self, saved: State, owned: bool) -> State:
        # `unstep_position` computes the position's float; the velocity's only if asked
        # (`velocity`). The kernels write into the integers: into the saved ones where they are
        # owned, else into copies (under retain_graph, the saved ones serve every backward).
        # After `finish`, x is the saved float, which nothing writes, and its correction.
        position = saved[0] if saved[0].is_floating_point() else None
        xi, vi, buffer, *words = saved[position is not None :]
        if position is None:
            position = torch.empty(0, dtype=self.dtype, device=xi.device)  # a placeholder
        contiguous = torch.contiguous_format
        ints = (t.to(copy=not owned, memory_format=contiguous) for t in (xi, vi))
        wide = buffer.dtype != self.buffer_dtype
        buffer = buffer.to(self.buffer_dtype, copy=not owned and not wide)
        if self.moving:  # the forward's grids, replayed (once: retain_graph walks them again)
            if not self._grids:
                assert self.grid is not None
                self._replay(self.grid.bits, self._moves)
            self.grid = self._grids[-1]
        return (position, _LAZY, *ints, buffer, *words)

    def _splits(self, xi: Tensor) -> bool:
        """Whether the memory-free stack may keep ``x`` as its float32 value and an int8
        correction (`kernels._part`, `finish`): an int32 word, `_corrects`, and every grid step
        of the forward within `_SPLIT_BITS`. One device sync."""
        if not (xi.dtype == torch.int32 and _corrects(self.dtype, self.p, self.q, self.pushes)):
            return False
        assert self.grid is not None
        low, high = _SPLIT_BITS
        # A moving grid's steps only grow: its rows' first grids and last ones bound them all.
        bits = [self.grid.bits]
        if self.moving and self._moves:
            moved = torch.stack(self._moves).sum(dim=0).reshape(bits[0].shape)
            bits.append(bits[0] + moved.to(torch.int32))
        every = torch.stack(bits)
        return bool(((every >= low) & (every <= high)).all())

    def unstep_position(self, state: State, n: int) -> State:
        xf, vf, xi, vi, *rest = state
        if self.moving:  # block n's input is on a grid of its own (`restore`)
            self.grid = self._grids[n]
        grid = self.grid
        assert grid is not None
        ahead, self._ahead = self._ahead, None
        if xi.dtype == torch.int8 and self.moving:  # x = xf and a correction (`finish`), shifted
            views = [grid.view(t) for t in (xf, xi, vi, rest[0])]
            new_xf = unstep_split_moving(*views, self._factors[n], grid.scale, grid.inv)
            return (new_xf.view(xi.shape), vf, xi, vi, *rest)
        if xi.dtype == torch.int8:  # x = xf and a correction (`finish`)
            new_xf = unstep_split(*(grid.view(t) for t in (xf, xi, vi)), grid.scale, grid.inv)
            return (new_xf.view(xi.shape), vf, xi, vi, *rest)
        # `unstep_velocity` has moved x already; `is` rejects a stale one from a backward that
        # stopped midway (a new walk starts on new integers, `restore`'s or `from_exact_state`'s).
        if ahead is vi:
            return (self._to_float(xi, xf.dtype), vf, xi, vi, *rest)
        if self.moving:  # x_{n+1} and v_{n+1} whole again from the buffer's low bits
            views = [grid.view(t) for t in (xi, vi, rest[0])]
            new_xf = unstep_position_moving(*views, self._factors[n], grid.inv, xf.dtype)
        else:
            new_xf = unstep_position(grid.view(xi), grid.view(vi), grid.inv, xf.dtype)
        return (new_xf.view(xi.shape), vf, xi, vi, *rest)

    def unstep_velocity(self, state: State, f: Tensor, n: int) -> State:
        """In place. With ``x``'s word, one step ahead: below block 0, the state's ``x`` already
        holds ``x_{n-1}``, whose float the next `unstep_position` computes, once the block's
        pullback has run (no float of the state's size more lives through it). With ``x`` as a
        float and a correction, ``x`` stays (the float is the block's input)."""
        xf, _, xi, vi, buffer, *words = state
        if self.p == 0:
            raise InertiaError("gamma = 0 is not invertible (the inverse divides by gamma).")
        grid = self.grid
        assert grid is not None
        if xi.dtype == torch.int8:
            views = [grid.view(t) for t in (vi, buffer, f.detach())]
            if self.moving:
                unstep_velocity_only_moving(*views, *self._on(xi.device), grid.c, self._factors[n])
            else:
                unstep_velocity_only(*views, *self._on(xi.device), grid.c)
            return (xf, _LAZY, xi, vi, buffer, *words)
        views = [grid.view(t) for t in (xi, vi, buffer)]
        args = (*views, grid.view(f.detach()), *self._on(xi.device), grid.c)
        if self.moving:  # this layer's shift popped; the one below read, for x one step ahead
            below = self._factors[n - 1] if n > 0 else torch.ones_like(self._factors[n])
            unstep_velocity_moving(*args, self._factors[n], below)
        elif n in self.pushes:
            unstep_velocity_pop(*args, grid.view(words.pop()))
        elif xi.dtype == torch.int32 and self.q <= NARROW_Q:
            unstep_velocity_narrow(*args)  # the same integers, in float64 arithmetic
        else:
            unstep_velocity(*args)
        if n > 0:
            self._ahead = vi
        else:
            xi.add_(vi)  # x_0 again: the kernel moved it one step ahead
        return (xf, _LAZY, xi, vi, buffer, *words)

    # -- the detector ----------------------------------------------------------------------------
    def fingerprint(self, state: State) -> Tensor:
        """A checksum of the fixed-point ``(x, v)``: the sums of their low 31 bits and of the
        rest (neither sum can overflow below 2**32 elements; the same for an int32 and an int64
        word). A block that computes something else when run again changes the values, which
        moves the sums; the emptied buffer, also checked, catches what they might miss. One
        compiled reduction without temporaries (eagerly, in chunks): the backward checks at block
        0, where its peak can be."""
        xf, _, xi, vi = state[:4]
        if xi.dtype == torch.int8:  # x = xf and a correction
            grid = self.grid
            assert grid is not None
            views = (grid.view(t) for t in (xf, xi, vi))
            split_sums: Tensor = checksum_split(*views, grid.scale)
            return split_sums
        result: Tensor = checksum(xi.view(-1), vi.view(-1))
        return result

    def verify(self, start: Tensor, state: State, check: Check) -> None:
        """Raise unless the backward rebuilt the forward's ``(x_0, v_0)`` and emptied the buffer."""
        buffer, words = state[4], state[5:]
        same = bool((self.fingerprint(state) == start).all()) and not bool(buffer.any())
        if same and not words:
            return
        raise InversionError(
            "exact mode: the memory-free backward did not rebuild the forward's input bit for bit "
            f"({check.depth} blocks, gamma={self.ratio}), so the gradients it computed are not "
            "those of the forward, and they had already been accumulated (every block's, into "
            ".grad or autograd.grad's results) when this was detected at the end of the stack's "
            "backward: discard this step. A block computed something different when run "
            "again: make it deterministic (torch.use_deterministic_algorithms(True); on CUDA, "
            "torch.backends.cudnn.benchmark = False), keep it free of side effects (no counters "
            "or caches that change between calls), or use use_backprop=True."
        )


_LAZY = torch.empty(0)  # the placeholder for a velocity float that nothing reads
_NO_FLOAT64 = frozenset({"mps"})  # device types without float64 tensors


def _check_device(device: torch.device) -> None:
    if device.type in _NO_FLOAT64:
        raise InertiaError(
            f"exact mode cannot run on {device.type!r}: its integer update converts through "
            "float64, which that device does not have. Use exact=False, or run the stack on the "
            "CPU or a CUDA device."
        )


def _recording(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _corrects(dtype: torch.dtype, p: int, q: int, pushes: frozenset[int]) -> bool:
    """Whether a stack of ``dtype`` with gamma ``p / q`` and word planes pushed at ``pushes`` can
    keep ``x`` as its float and an int8 correction, its grid's range aside (`_splits`): float32
    floats, gamma > 0, no word plane and ``q <= NARROW_Q`` (the kernels that leave ``x`` alone)."""
    return dtype == torch.float32 and p > 0 and not pushes and q <= NARROW_Q


def bits_per_element(gamma: float, depth: int) -> int:
    """Bits per element that the buffer takes after ``depth`` layers, as `ExactState` holds it:
    the smallest integer dtype its bound allows, or, where word planes were pushed, 64 plus the
    planes (the memory-free backward then keeps the int64 part in the smallest dtype)."""
    ratio = rational_gamma(gamma)
    if ratio.numerator == 0:
        return 0
    pushes, kept = _schedule(ratio.numerator, ratio.denominator, depth)
    return 64 + WORD * len(pushes) if pushes else torch.iinfo(kept).bits


def kept_bytes_per_element(gamma: float, depth: int, dtype: torch.dtype) -> int:
    """Bytes per element of the state that a memory-free stack of ``depth`` blocks in exact mode
    keeps from its forward to its backward (`ExactArithmetic.finish`), beside its float output:
    ``x`` as a one-byte correction to that output in a float32 stack whose buffer pushes no word
    plane (where its grid steps stay within float32's normal range, as every input's but the
    subnormal and the huge do), else in its word; ``v`` in its word (int32 for float32 and 16-bit
    stacks while their values fit, int64 for float64 ones); and the buffer in the smallest dtype
    its bound allows, with its word planes."""
    word = 8 if dtype == torch.float64 else 4
    ratio = rational_gamma(gamma)
    if ratio.numerator == 0:
        return 2 * word
    pushes, kept = _schedule(ratio.numerator, ratio.denominator, depth)
    split = _corrects(dtype, ratio.numerator, ratio.denominator, pushes)
    return (1 if split else word) + word + kept.itemsize + (WORD // 8) * len(pushes)
