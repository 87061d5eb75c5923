"""Fixed-point momentum arithmetic whose inverse is bit-exact at any depth and gamma.

``x`` and ``v`` are integers on a grid of step ``2**-fraction_bits`` (int64 on the tensor's
device). Each block sees the float value of the fixed-point ``x``; its contribution
``(1 - gamma) f`` is rounded onto the grid before it enters the update, so the forward and the
inverse add and subtract identical integers.

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
    WORD,
    checksum,
    eager,
    step,
    step_push,
    to_float,
    unstep_position,
    unstep_velocity,
    unstep_velocity_pop,
)

__all__ = ["ExactArithmetic", "ExactState", "bits_per_element", "rational_gamma"]

_MAX_DENOMINATOR = 1 << 24  # p q < 2**48, so t = c p + s never overflows
_BUFFER_CAP = 1 << 51  # the buffer stays below this (the kernels divide it exactly through float64)
_LIMIT = 1 << 61  # |x|, |v| and each rounded block output stay within this many grid steps
_GRID_CHUNK = 1 << 20  # elements rounded onto the grid at a time (8 MiB of float64 temporaries)


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


@dataclass(frozen=True)
class ExactState:
    """The fixed-point state of an exact `MomentumNet`, from ``forward(x, return_state=True)``.

    Attributes:
        position: ``x`` as a float tensor of the input's shape and dtype (with autograd history
            when the forward recorded one).
        velocity: ``v``, likewise.
        x: ``x`` in fixed point: int64, the value times ``2**fraction_bits``.
        v: ``v`` in fixed point.
        buffer: int64, the information that the multiplications by gamma dropped.
        words: int32 planes of older buffer bits, oldest first.
        gamma: The rational gamma of the update.
        fraction_bits: The grid step is ``2**-fraction_bits``.
    """

    position: Tensor
    velocity: Tensor
    x: Tensor
    v: Tensor
    buffer: Tensor
    words: tuple[Tensor, ...]
    gamma: Fraction
    fraction_bits: int

    @property
    def buffer_bits_per_element(self) -> int:
        """Bits of the buffer and its word planes per element."""
        return 64 + WORD * len(self.words)

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


class ExactArithmetic:
    """The momentum update in fixed point, with a bit-exact inverse (see the module docstring).

    A state is ``(x_float, v_float, x, v, buffer, *word_planes)``. ``step`` is exact in the
    integers; where autograd records, the float tensors carry the gradient of the float update
    (rounding passes gradients straight through), so ``use_backprop=True`` is the memory-free
    mode's twin. Where autograd does not record, ``v_float`` is an empty placeholder (`velocity`
    computes it from ``v`` if asked).
    """

    # Pure Python set-up (a Fraction, an lru_cache'd schedule, which dynamo warns about tracing):
    # under torch.compile it runs eagerly.
    @eager
    def __init__(
        self, gamma: float, fraction_bits: int, depth: int, relative: bool = False
    ) -> None:
        self.ratio = rational_gamma(gamma)
        self.p, self.q = self.ratio.numerator, self.ratio.denominator
        self.gamma = float(self.ratio)
        self._set_bits(fraction_bits)
        # Relative precision: ``fraction_bits`` holds at magnitude 1, and the first input rounded
        # onto the grid moves it by that input's binary exponent (see `_calibrate`).
        self.relative = relative
        self.base_bits = fraction_bits
        self.depth = depth
        self.pushes, self.kept_buffer = (
            _schedule(self.p, self.q, depth) if self.p else (frozenset(), torch.int64)
        )
        self._constants: dict[torch.device, tuple[Tensor, ...]]
        self._largest: list[Tensor] = []
        self._nonfinite = False  # a NaN or inf entered since `encode`
        self.finite = True  # what the last `check_range` found
        # (v_n, the float of x_{n-1}): from `unstep_velocity`, for the next `unstep_position`.
        self._ahead: tuple[Tensor, Tensor] | None = None
        self.dtype = torch.float32  # of the floats, set by `encode`

    def _on(self, device: torch.device) -> tuple[Tensor, ...]:
        """``p``, ``q``, ``(1 - gamma) * 2**bits`` and ``2**-bits`` as 0-d tensors (kernel
        arguments, so that one compiled kernel serves every gamma)."""
        if device not in self._constants:
            ints = (torch.tensor(c, device=device) for c in (self.p, self.q))
            floats = ((self.q - self.p) / self.q * self.scale, 1 / self.scale)
            doubles = (torch.tensor(c, dtype=torch.float64, device=device) for c in floats)
            self._constants[device] = (*ints, *doubles)
        return self._constants[device]

    def _set_bits(self, fraction_bits: int) -> None:
        self.fraction_bits = fraction_bits
        self.scale = float(2**fraction_bits)
        self._constants = {}

    def _calibrate(self, largest: float) -> float:
        """Where relative: place the grid for an input of largest magnitude ``largest`` (on the
        current grid), so that its binary exponent is that of 1. Returns the factor, a power of
        two, that moves ``largest`` there."""
        self.relative = False  # once per forward: the input's, then every tensor's grid
        if not (largest > 0 and math.isfinite(largest)):
            return 1.0
        exponent = math.frexp(largest / self.scale)[1] - 1  # |x| < 2**(exponent + 1)
        bits = min(max(self.base_bits - exponent, 1), 60)
        factor = 2.0 ** (bits - self.fraction_bits)
        self._set_bits(bits)
        return factor

    # -- conversions ------------------------------------------------------------------------------
    def _to_grid(self, t: Tensor, what: str) -> tuple[Tensor, Tensor]:
        """Round ``t`` onto the grid, raising now if a finite value does not fit (a NaN or inf
        marks the forward non-finite instead, see `check_range`). Returns the integers,
        contiguous (the kernels write into flat views of them), and their value as floats of
        ``t``'s dtype: through float64, equal to `to_float` of the integers, since the rounded
        float64 values are the integers themselves and scaling by a power of two is exact."""
        source = t.detach().reshape(-1)
        ints = torch.empty(t.shape, dtype=torch.int64, device=t.device)
        values = torch.empty(t.shape, dtype=t.dtype, device=t.device)
        if not source.numel():
            return ints, values
        # max |t| is one of t's values, and scaling by a power of two is exact: this is the
        # largest scaled value, read without a float64 copy of t (the one device sync).
        largest = float(torch.linalg.vector_norm(source, math.inf)) * self.scale
        if self.relative:
            largest *= self._calibrate(largest)  # exact: a power of two
        nonfinite = not math.isfinite(largest)
        if not largest < _LIMIT:  # NaN included
            if not nonfinite:
                raise self._range_error(what, t)
            self._nonfinite = True
        # Chunk by chunk, so that the float64 temporaries stay small beside the state.
        flat_ints, flat_values = ints.view(-1), values.view(-1)
        for start in range(0, source.numel(), _GRID_CHUNK):
            part = slice(start, start + _GRID_CHUNK)
            scaled = source[part].to(torch.float64, copy=True).mul_(self.scale)
            if nonfinite:
                scaled.nan_to_num_(0.0, 0.0, 0.0)
            scaled.round_().add_(0.0)  # + 0.0: -0.0 is 0.0, as `to_float` gives
            flat_ints[part] = scaled
            flat_values[part] = scaled.mul_(1 / self.scale)
        return ints, values

    def _to_float(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        return to_float(t, self._on(t.device)[3], dtype)

    def _range_error(self, what: str, t: Tensor | None = None) -> InertiaError:
        largest = "" if t is None else f" (largest magnitude {float(t.detach().abs().amax()):.3g})"
        if self.base_bits != self.fraction_bits:  # placed for the input
            where = (
                f"below 2**{61 - self.fraction_bits}, 2**{61 - self.base_bits} times the input's "
                "binary magnitude (the grid follows the input's scale)"
            )
        else:
            where = f"below 2**{61 - self.fraction_bits}"
        return InertiaError(
            f"exact mode: {what} does not fit the fixed-point range: magnitudes must be finite and "
            f"{where}, with fraction_bits={self.fraction_bits}{largest}. Pass a lower "
            "fraction_bits (a fixed grid of step 2**-fraction_bits), or normalize the activations."
        )

    def on_grid(self, x: Tensor) -> Tensor:
        """``x`` as the blocks see it: the float value of its fixed-point rounding."""
        value = self._to_grid(x, "the input")[1]
        return _StraightThrough.apply(x, value) if _recording(x) else value

    def encode(self, x: Tensor, v: Tensor | None) -> State:
        _check_device(x.device)
        self._nonfinite = False
        xi, xf = self._to_grid(x, "the input")
        if v is None:
            vi, vf = torch.zeros_like(xi), torch.zeros_like(xf)
        else:
            vi, vf = self._to_grid(v, "v_0 = init_function(x_0)")
        if _recording(x):
            xf = _StraightThrough.apply(x, xf)
        if v is not None and _recording(v):
            vf = _StraightThrough.apply(v, vf)
        self._largest = []
        self.dtype = x.dtype
        return (xf, vf, xi, vi, torch.zeros_like(xi))

    def position(self, state: State) -> Tensor:
        return state[0]

    def to_exact_state(self, state: State) -> ExactState:
        """``state`` as the public `ExactState`."""
        if not self.finite:
            raise InertiaError(
                "exact mode: the forward met a NaN or inf, so it has no fixed-point state to "
                "return (its output is NaN)."
            )
        xf, _, xi, vi, buffer, *words = state
        vf = self.velocity(state)
        return ExactState(xf, vf, xi, vi, buffer, tuple(words), self.ratio, self.fraction_bits)

    def from_exact_state(self, state: ExactState) -> State:
        """The tuple for ``state``, after checking that this stack's forward made it."""
        if self.relative:  # the grid that the forward placed for its input
            self.relative = False
            self._set_bits(state.fraction_bits)
        if (state.gamma, state.fraction_bits) != (self.ratio, self.fraction_bits):
            raise ValueError(
                f"the state was made with gamma={state.gamma} and fraction_bits="
                f"{state.fraction_bits}, but this MomentumNet has gamma={self.ratio} and "
                f"fraction_bits={self.fraction_bits}."
            )
        if len(state.words) != len(self.pushes):
            raise ValueError(
                f"the state's buffer has {len(state.words)} word planes, but a forward through "
                f"these {self.depth} blocks leaves {len(self.pushes)}; it comes from a stack of "
                "another depth."
            )
        _check_device(state.x.device)
        dtype = state.position.dtype
        xf, vf = (self._to_float(t, dtype) for t in (state.x, state.v))
        # Copies, contiguous: the kernels write into the integers (and not into the caller's).
        contiguous = torch.contiguous_format
        ints = (t.clone(memory_format=contiguous) for t in (state.x, state.v, state.buffer))
        return (xf, vf, *ints, *state.words)

    def velocity(self, state: State) -> Tensor:
        vf, vi = state[1], state[3]
        return vf if vf.shape == vi.shape else self._to_float(vi, state[0].dtype)

    # -- the update and its inverse -------------------------------------------------------------
    # The kernels work on flat tensors, so that one compiled kernel serves every shape.
    def step(self, state: State, f: Tensor, n: int) -> State:
        xf, vf, xi, vi, buffer, *words = state
        p, q, c, inv = self._on(xi.device)
        shape, dtype = xi.shape, xf.dtype
        recording = _recording(vf, f, xf)
        # v_n's float, read before the kernel moves the integers on (a placeholder if the stack's
        # first blocks did not record).
        vf = self.velocity(state) if recording else vf
        if xi.numel() == 0:  # an empty batch: nothing moves (and no reduction over nothing)
            largest = torch.zeros((), dtype=torch.float64, device=xi.device)
            new_xf, new_vf = self._to_float(xi, dtype), self._to_float(vi, dtype)
        elif self.p == 0:  # gamma = 0: v is forgotten, there is nothing to keep (backprop only)
            scaled = f.detach().double() * c
            vi = scaled.round().long()
            xi = xi + vi
            largest = torch.stack([t.abs().amax().double() for t in (scaled, vi, xi)]).amax()
            new_xf, new_vf = self._to_float(xi, dtype), self._to_float(vi, dtype)
        else:
            kernel = step_push if n in self.pushes else step
            flat = [t.view(-1) for t in (xi, vi, buffer)]  # the state's own integers: in place
            word, largest, new_xf = kernel(*flat, f.detach().reshape(-1), p, q, c, inv, dtype)
            new_xf = new_xf.view(shape)
            if word is not None:
                words.append(word.view(shape))
            new_vf = self._to_float(vi, dtype) if recording else _LAZY
        # |(1 - gamma) f|, |v| and |x| below 2**61 at every layer keep every sum below 2**63 (by
        # induction). Checked once per forward by `check_range`, not with a device sync per layer;
        # the backward recomputes the same values, which the detector verifies.
        self._largest.append(largest)
        if recording:
            ghost_v = self.gamma * vf + (1 - self.gamma) * f
            new_vf = _StraightThrough.apply(ghost_v, new_vf)
            new_xf = _StraightThrough.apply(xf + new_vf, new_xf)
        return (new_xf, new_vf, xi, vi, buffer, *words)

    def check_range(self) -> bool:
        """Whether the forward since `encode` stayed finite, raising if a finite value left the
        range (one device sync per forward). False where a NaN or inf entered (the input, ``v_0``
        or a block's output): the state's integers are then meaningless, and `poisoned` gives
        the state to return."""
        largest, self._largest = self._largest, []
        nonfinite, self._nonfinite = self._nonfinite, False
        self.finite = False
        if nonfinite:
            return False
        if largest:
            values = torch.stack(largest)
            bad = ~(values < _LIMIT)  # True for NaN too
            if bool(bad.any()):
                n = int(bad.nonzero()[0, 0])
                if not bool(values[n].isfinite()):  # the first bad layer met a NaN or inf
                    return False
                raise self._range_error(f"the output of block {n} (or the state x or v after it)")
        self.finite = True
        return True

    def poisoned(self, state: State) -> State:
        """``state`` with NaN floats, whose autograd history is kept, so that every gradient
        through them is NaN: what a forward that met a NaN or inf returns (``GradScaler`` then
        skips the step)."""
        xf, _, *ints = state
        vf = self.velocity(state)
        return (xf * math.nan, vf * math.nan, *ints)

    def saved(self, state: State) -> State:
        """The integers: ``x``, ``v``, the buffer and its word planes (the floats follow). The
        buffer in the smallest dtype that its bound allows (one byte per element where fewer than
        17 blocks have filled it at gamma 0.9; always for one block)."""
        xi, vi, buffer, *words = state[2:]
        return (xi, vi, buffer.to(self.kept_buffer), *words)

    def restore(self, saved: State, owned: bool) -> State:
        # `unstep_position` computes the position's float; the velocity's only if asked
        # (`velocity`). The kernels write into the integers: into the saved ones where they are
        # owned, else into copies (under retain_graph, the saved ones serve every backward).
        words = saved[3:]
        placeholder = torch.empty(0, dtype=self.dtype, device=saved[0].device)
        contiguous = torch.contiguous_format
        ints = (t.to(torch.int64, copy=not owned, memory_format=contiguous) for t in saved[:3])
        return (placeholder, _LAZY, *ints, *words)

    def unstep_position(self, state: State) -> State:
        xf, vf, xi, vi, *rest = state
        ahead, self._ahead = self._ahead, None
        # `unstep_velocity` has moved x already; `is` rejects a stale one from a backward that
        # stopped midway (a new walk starts on new integers, `restore`'s or `from_exact_state`'s).
        if ahead is not None and ahead[0] is vi:
            return (ahead[1], vf, xi, vi, *rest)
        new_xf = unstep_position(xi.view(-1), vi.view(-1), self._on(xi.device)[3], xf.dtype)
        return (new_xf.view(xi.shape), vf, xi, vi, *rest)

    def unstep_velocity(self, state: State, f: Tensor, n: int) -> State:
        """In place, and one step ahead: below block 0, the state's ``x`` already holds
        ``x_{n-1}``, which the next `unstep_position` returns with its float."""
        xf, _, xi, vi, buffer, *words = state
        if self.p == 0:
            raise InertiaError("gamma = 0 is not invertible (the inverse divides by gamma).")
        flat = [t.view(-1) for t in (xi, vi, buffer)]
        args = (*flat, f.detach().reshape(-1), *self._on(xi.device), xf.dtype)
        if n in self.pushes:
            xf_prev = unstep_velocity_pop(*args, words.pop().reshape(-1))
        else:
            xf_prev = unstep_velocity(*args)
        if n > 0:
            self._ahead = (vi, xf_prev.view(xi.shape))
        else:
            xi.add_(vi)  # x_0 again: the kernel moved it one step ahead
        return (xf, _LAZY, xi, vi, buffer, *words)

    # -- the detector ----------------------------------------------------------------------------
    def fingerprint(self, state: State) -> Tensor:
        """A checksum of the fixed-point ``(x, v)``: the sums of their low 31 bits and of the
        rest (neither sum can overflow below 2**32 elements). A block that computes something else
        when run again changes the values, which moves the sums; the emptied buffer, also checked,
        catches what they might miss. One compiled reduction without temporaries (eagerly, in
        chunks): the backward checks at block 0, where its peak can be."""
        result: Tensor = checksum(state[2].view(-1), state[3].view(-1))
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


def bits_per_element(gamma: float, depth: int) -> int:
    """Bits per element that the buffer takes after ``depth`` layers (64 plus its word planes), as
    `ExactState` holds it; the memory-free backward keeps the int64 part in the smallest integer
    dtype its bound allows."""
    ratio = rational_gamma(gamma)
    if ratio.numerator == 0:
        return 0
    return 64 + WORD * len(_schedule(ratio.numerator, ratio.denominator, depth)[0])
