"""The integer kernels of exact mode, fused by ``torch.compile``.

Integer division is the costly part of exact mode: eager PyTorch (and inductor, which emits one
division instruction per element) spend about 1.5 ns per element on each. Here every floor division
by ``d <= 2**24`` is an estimate in float64 followed by an integer correction, which vectorizes, and
the whole update of one layer, float conversions included, is one compiled kernel: about 12 times
faster than eager on a CPU. The results are exact integers whichever way they are computed, so the
compiled and the eager kernels agree bit for bit and may even be mixed between a forward and its
backward. When compilation is not possible (no C++ compiler, an unsupported device), the kernels
run eagerly after one warning; so they do, without one, under a Python dispatch mode (a FLOP
counter, a memory tracker), which dynamo does not trace. Eagerly, a kernel works on at most
``CHUNK`` elements at a time, so that its int64 and float64 temporaries stay small beside the
state, whatever its size.

The kernels take 2-D tensors, one row per grid row of the state (see `exact`): ``x`` and ``v``
in their word (int32 or int64), the buffer in its own dtype (uint8 to int64), the block's output
``f``, and per-row constants of shape ``(rows, 1)`` (or ``(1, 1)`` for one grid). They compute in
int64 registers and write the new integers into the tensors they are given, so that a layer's
update allocates only its float output: callers pass integers that they own. An int32 word is
saturated where a value leaves it (the forward's range check then reruns the stack on a grid that
moves, or in int64), so that nothing wraps.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import torch
from torch import Tensor

__all__ = [
    "CHUNK",
    "MOVING_LIMIT",
    "MOVING_TOP",
    "NARROW_LIMIT",
    "NARROW_Q",
    "WORD",
    "checksum",
    "checksum_split",
    "convert",
    "correction",
    "eager",
    "momentum_pullback",
    "momentum_update",
    "momentum_update_",
    "power_of_two",
    "round_to_grid",
    "step",
    "step_moving",
    "step_narrow",
    "step_push",
    "to_float",
    "unstep_position",
    "unstep_position_moving",
    "unstep_split",
    "unstep_split_moving",
    "unstep_velocity",
    "unstep_velocity_moving",
    "unstep_velocity_narrow",
    "unstep_velocity_only",
    "unstep_velocity_only_moving",
    "unstep_velocity_pop",
]

WORD = 32  # bits per word plane of the buffer
_WORD_MASK = (1 << WORD) - 1
_WORD_OFFSET = 1 << (WORD - 1)  # a word w in [0, 2**32) is stored as the int32 w - 2**31


def _divmod(n: Tensor, d: Tensor, small: bool) -> tuple[Tensor, Tensor]:
    """Floor division and remainder of int64 ``n`` by the 0-d int64 ``1 <= d <= 2**24``.

    The quotient is estimated as ``n * (1 / d)`` in float64 (a multiplication: a vector division
    would bound the kernel's speed), which is off by at most one where ``|n| < 2**51``
    (``small``): the relative error of two roundings, ``2**-52``, times ``|n / d| < 2**51``, is at
    most one half. Otherwise (``|n| < 2**62``) a second estimate on the remainder (below
    ``2**35``) brings it there, and an integer correction makes the result exact.
    """
    inverse = 1.0 / d.double()
    quot = torch.floor(n.double() * inverse).long()
    rem = n - quot * d
    if not small:
        step = torch.floor(rem.double() * inverse).long()
        quot, rem = quot + step, rem - step * d
    low, high = rem < 0, rem >= d
    quot = quot - low.long() + high.long()
    zero = torch.zeros_like(d)
    rem = rem + torch.where(low, d, zero) - torch.where(high, d, zero)
    return quot, rem


def to_float(i: Tensor, inv_scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The value of fixed-point ``i`` (times the power of two ``inv_scale``) in ``dtype``.

    An int64 goes through float64 as ``hi * 2**32 + lo``: both parts and the product are exact, so
    the one rounding is that of an IEEE addition, the same in every implementation (eager,
    compiled, fused into a multiply-add); an int64 conversion instruction might round otherwise.
    An int32 converts exactly.
    """
    if i.dtype == torch.int64:
        value = (i >> WORD).double() * float(1 << WORD) + (i & _WORD_MASK).double()
    else:
        value = i.double()
    return (value * inv_scale).to(dtype)


NARROW_LIMIT = (1 << 31) - 1  # the largest magnitude an int32 word holds (saturated there)


def _store(dst: Tensor, value: Tensor) -> None:
    """Write int64 ``value`` into ``dst``, saturating where ``dst`` is an int32 word."""
    if dst.dtype == torch.int32:
        value = value.clamp(-NARROW_LIMIT, NARROW_LIMIT)
    dst.copy_(value)


def _rowwise(t: Tensor, row: Tensor) -> Tensor:
    """``t`` itself (``t + 0 row``, for a finite per-row constant ``row``), made a function of
    the grid row. Inductor gives the work that reads a per-row constant a loop nest over
    ``(rows, inner)``, and the work that reads none (the buffer's digits) a flattened loop of its
    own, which a kernel then computes twice, once for each nest; so it is one nest, half the
    time. The sum is exact: the same bits."""
    zero = row * 0
    return t + (zero.long() if t.dtype == torch.int64 else zero)


def _largest(*ts: Tensor) -> Tensor:
    """The largest magnitude among the float64 ``ts`` (2-D), row by row first: a reduction that
    inductor fuses into the per-row loop nest that computes them, where a whole-tensor one would
    take a pass of its own."""
    largest = ts[0].abs()
    for t in ts[1:]:
        largest = torch.maximum(largest, t.abs())
    return largest.amax(dim=-1).amax()


def _mul_gamma(
    x: Tensor, v: Tensor, buffer: Tensor, scaled: Tensor, p: Tensor, q: Tensor, push: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``v <- gamma v + round(scaled)`` (a bijection of ``(v, buffer)``), ``x <- x + v``."""
    d = scaled.round().long()
    buffer, s = _divmod(buffer, p, small=True)  # p new low digits for v
    word = None
    if push:
        word = ((buffer & _WORD_MASK) - _WORD_OFFSET).to(torch.int32)
        buffer = buffer >> WORD
    a, c = _divmod(v, q, small=False)
    hi, r = _divmod(c * p + s, q, small=True)  # c p + s < p q <= 2**48
    v = a * p + hi + d
    return x + v, v, buffer * q + r, word


def _step(
    x: Tensor,
    v: Tensor,
    buffer: Tensor,
    f: Tensor,
    p: Tensor,
    q: Tensor,
    c: Tensor,
    inv: Tensor,
    dtype: torch.dtype,
    push: bool = False,
) -> tuple[Any, ...]:
    """One layer, written into ``x``, ``v`` and ``buffer``: ``scaled = c f`` is
    ``(1 - gamma) f`` in grid units. Returns the word plane pushed (None unless ``push``), the
    largest of ``|x|``, ``|v|``, ``|scaled|`` before any saturation (float64; NaN if ``f`` has a
    NaN), and ``x`` as a float of ``dtype`` (the next block's input; ``v``'s float is needed only
    at the end)."""
    scaled = f.double() * c
    new_x, new_v, new_buffer, word = _mul_gamma(
        x.long(), v.long(), _rowwise(buffer.long(), c), scaled, p, q, push
    )
    # The integers' own reduction stays whole: inductor fails on it row by row (KeyError).
    largest = torch.maximum(new_v.abs(), new_x.abs()).amax().double()
    largest = torch.maximum(largest, _largest(scaled))
    position = to_float(new_x, inv, dtype)
    _store(x, new_x)
    _store(v, new_v)
    buffer.copy_(new_buffer)  # the schedule bounds it within its dtype
    return word, largest, position


def _step_push(
    x: Tensor,
    v: Tensor,
    buffer: Tensor,
    f: Tensor,
    p: Tensor,
    q: Tensor,
    c: Tensor,
    inv: Tensor,
    dtype: torch.dtype,
) -> tuple[Any, ...]:
    """`_step` at a layer that pushes a word plane (a function of its own, so that each
    compiled variant has its own cache)."""
    return _step(x, v, buffer, f, p, q, c, inv, dtype, push=True)


def _unstep_position(x: Tensor, v: Tensor, inv: Tensor, dtype: torch.dtype) -> Tensor:
    """``x <- x - v`` in place (the forward's values: no overflow); returns its float."""
    x.sub_(v)
    return to_float(x, inv, dtype)


def _unstep_velocity(
    x: Tensor,
    v: Tensor,
    buffer: Tensor,
    f: Tensor,
    p: Tensor,
    q: Tensor,
    c: Tensor,
    word: Tensor | None = None,
) -> None:
    """The inverse of `_step`'s velocity update, from ``v_{n+1}`` to ``v_n`` given ``x = x_n``,
    written into ``v`` and ``buffer``; and, one step ahead (saving a pass over the integers),
    ``x_{n-1} = x_n - v_n`` written into ``x``, whose float the caller converts once the block's
    pullback has freed its memory. Below block 0, ``x_0 - v_0`` is no state and may leave an
    int32 word: it wraps there, and the caller's ``x += v`` wraps back to ``x_0`` (integer
    arithmetic modulo ``2**32``)."""
    d = (f.double() * c).round().long()
    new_buffer, r = _divmod(buffer.long(), q, small=True)
    if word is not None:
        new_buffer = (new_buffer << WORD) + (word.long() + _WORD_OFFSET)
    a, t = _divmod(v.long() - d, p, small=False)
    high, s = _divmod(t * q + r, p, small=True)
    new_v = a * q + high
    v.copy_(new_v)
    buffer.copy_(new_buffer * p + s)
    x.copy_(x.long() - new_v)


def _unstep_velocity_pop(
    x: Tensor,
    v: Tensor,
    buffer: Tensor,
    f: Tensor,
    p: Tensor,
    q: Tensor,
    c: Tensor,
    word: Tensor,
) -> None:
    """`_unstep_velocity` at a layer that pops a word plane."""
    _unstep_velocity(x, v, buffer, f, p, q, c, word)


# -- int32 words, in float64 arithmetic ----------------------------------------------------------
# With x and v in int32 words and q <= NARROW_Q, every integer of a layer's update and of its
# inverse stays below 2**51 in magnitude, where float64 holds integers exactly and a quotient
# estimated by a multiplication is off by at most one: the kernels below compute in float64
# alone (no int64 conversions, which CPUs vectorize poorly) and fold the division of v by q and
# the carry from the buffer into one division of v p + s. Their integers are `_step`'s and
# `_unstep_velocity`'s (tests/test_exact.py checks them against each other and Python's).

NARROW_Q = 1 << 19  # |v p + s| and |(v - d) q + r| stay below 2**51 with |v|, |d| < 2**31


def _divmod_exact(n: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Floor division and remainder of the float64 integers ``n`` (``|n| < 2**51``) by the
    float64 integer ``1 <= d <= 2**24`` (0-d), in float64."""
    quot = torch.floor(n * (1.0 / d))
    rem = n - quot * d
    low, high = rem < 0, rem >= d
    quot = torch.where(low, quot - 1, torch.where(high, quot + 1, quot))
    rem = torch.where(low, rem + d, torch.where(high, rem - d, rem))
    return quot, rem


def _step_narrow(
    x: Tensor,
    v: Tensor,
    buffer: Tensor,
    f: Tensor,
    p: Tensor,
    q: Tensor,
    c: Tensor,
    inv: Tensor,
    dtype: torch.dtype,
) -> tuple[Any, ...]:
    """`_step` for int32 words and ``q <= NARROW_Q``, at a layer that pushes no word plane:
    ``v <- floor((v p + s) / q) + round(c f)`` with ``s = buffer mod p``, the remainder of the
    division going to the buffer."""
    new_x, new_v, new_buffer, scaled = _narrow_update(x, v, buffer, f, p, q, c)
    largest = _largest(new_v, new_x, scaled)
    position = (new_x * inv).to(dtype)
    limit = float(NARROW_LIMIT)
    x.copy_(new_x.clamp(-limit, limit))
    v.copy_(new_v.clamp(-limit, limit))
    buffer.copy_(new_buffer)
    return None, largest, position


def _narrow_update(
    x: Tensor, v: Tensor, buffer: Tensor, f: Tensor, p: Tensor, q: Tensor, c: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One layer's new ``x``, ``v`` and buffer, and ``scaled = c f``, in float64: `_step_narrow`'s
    arithmetic, for a buffer below ``2**31``."""
    pd, qd = p.double(), q.double()
    scaled = f.double() * c
    high, s = _divmod_exact(_rowwise(buffer.double(), c), pd)
    new_v, r = _divmod_exact(v.double() * pd + s, qd)
    new_v = new_v + scaled.round()
    return x.double() + new_v, new_v, high * qd + r, scaled


def _narrow_velocity(
    v: Tensor, buffer: Tensor, f: Tensor, p: Tensor, q: Tensor, c: Tensor
) -> tuple[Tensor, Tensor]:
    """``v_n`` and the buffer below it, from ``v_{n+1}`` (int32 word, ``q <= NARROW_Q``, no word
    plane popped), in float64."""
    pd, qd = p.double(), q.double()
    high, r = _divmod_exact(buffer.double(), qd)
    new_v, s = _divmod_exact((v.double() - (f.double() * c).round()) * qd + r, pd)
    return new_v, high * pd + s


def _unstep_velocity_narrow(
    x: Tensor,
    v: Tensor,
    buffer: Tensor,
    f: Tensor,
    p: Tensor,
    q: Tensor,
    c: Tensor,
) -> None:
    """`_unstep_velocity` for int32 words and ``q <= NARROW_Q``, at a layer that pops no word
    plane. ``x_{n-1} = x_n - v_n`` below block 0 may leave the word: it is stored modulo
    ``2**32``, as an int64 would be truncated, and the caller's ``x += v`` wraps back."""
    new_v, new_buffer = _narrow_velocity(v, buffer, f, p, q, c)
    v.copy_(new_v)
    buffer.copy_(new_buffer)
    x.copy_(_wrap32(x.double() - new_v))


def _wrap32(x: Tensor) -> Tensor:
    """The float64 integer ``x`` modulo ``2**32``, in ``[-2**31, 2**31)``: as an int64 is truncated
    to an int32 word."""
    return x - torch.floor((x + 2.0**31) * 2.0**-32) * 2.0**32


# -- a grid that moves ---------------------------------------------------------------------------
# With int32 words, a row of the state (a token, a channel) whose values grow past 2**30 grid steps
# moves to a coarser grid: after the layer's update, computed on the row's grid in float64 (exact
# below 2**50, `MOVING_LIMIT`), the row's new x and v are divided by 2**k, the fewest bits that
# bring them below 2**30, and the k low bits that each drops go to the buffer, above the
# remainders of the gamma product (``buffer <- (buffer 2**k + dx) 2**k + dv``): a bijection, which
# the inverse undoes, reading the buffer's low digits. The backward replays the shifts from their
# record (one k per row and layer); where k = 0, these kernels compute the fixed grid's integers.

MOVING_TOP = 30  # a moving grid keeps |x| and |v| at most 2**30 grid steps
MOVING_LIMIT = float(1 << 50)  # |x|, |v| and |c f| on the layer's grid, before the shift


def power_of_two(k: Tensor) -> Tensor:
    """``2.0**k`` exactly, in float64, for integer-valued ``|k| <= 1000`` (any dtype), from the
    IEEE exponent."""
    return ((k.long() + 1023) << 52).view(torch.float64)


def _shift_for(largest: Tensor) -> Tensor:
    """The fewest bits ``k >= 0`` (float64) with ``largest < 2**(MOVING_TOP + k)``, read from
    the float64 exponent of the (non-negative) ``largest``, at most 60 (NaN and inf, which
    `check_range` reports, give 0 or 60)."""
    biased = largest.view(torch.int64) >> 52  # 2**(biased - 1023) <= largest, for normal numbers
    return (biased - (1022 + MOVING_TOP)).clamp(0, 60).double()


def _moving_rows(
    x: Tensor, v: Tensor, buffer: Tensor, f: Tensor, p: Tensor, q: Tensor, c: Tensor
) -> tuple[Tensor, Tensor]:
    """The largest new ``|x|`` and ``|v|`` of each row (``(rows, 1)``, float64, on the rows'
    grids before any shift), and the largest ``|c f|``."""
    new_x, new_v, _, scaled = _narrow_update(x, v, buffer, f, p, q, c)
    rows = torch.maximum(new_x.abs(), new_v.abs()).amax(dim=-1, keepdim=True)
    return rows, _largest(scaled)


def _shifted(
    x: Tensor,
    v: Tensor,
    buffer: Tensor,
    f: Tensor,
    p: Tensor,
    q: Tensor,
    c: Tensor,
    inv: Tensor,
    dtype: torch.dtype,
    k: Tensor,
) -> Tensor:
    """One layer's update (`_narrow_update`), with the rows' new x and v shifted right by ``k``
    bits (``(rows, 1)``) and the dropped bits pushed onto the buffer, written into ``x``, ``v`` and
    ``buffer``; returns x's float on the new grid (whose step is ``2**k`` times the old one)."""
    new_x, new_v, new_buffer, _ = _narrow_update(x, v, buffer, f, p, q, c)
    m, inv_m = power_of_two(k), power_of_two(-k)
    high_x, high_v = torch.floor(new_x * inv_m), torch.floor(new_v * inv_m)
    pushed = ((new_buffer * m) + (new_x - high_x * m)) * m + (new_v - high_v * m)
    limit = float(NARROW_LIMIT)
    position = (high_x * (inv * m)).to(dtype)
    x.copy_(high_x.clamp(-limit, limit))
    v.copy_(high_v.clamp(-limit, limit))
    buffer.copy_(pushed.clamp(-limit, limit))  # beyond the word: `check_range` reruns the forward
    return position


def _step_moving(
    x: Tensor,
    v: Tensor,
    buffer: Tensor,
    f: Tensor,
    p: Tensor,
    q: Tensor,
    c: Tensor,
    inv: Tensor,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """`_step_narrow` on a moving grid: each row shifts by the fewest bits ``k`` that keep its new
    x and v within ``2**MOVING_TOP`` steps. Returns the largest magnitude before the shifts
    (float64, for `check_range` against `MOVING_LIMIT`), x's float, and ``k`` (``(rows, 1)``,
    float64). Compiled, the rows' reduction and their update share one loop nest."""
    rows, scaled = _moving_rows(x, v, buffer, f, p, q, c)
    k = _shift_for(rows)
    position = _shifted(x, v, buffer, f, p, q, c, inv, dtype, k)
    return torch.maximum(rows.amax(), scaled), position, k


def _step_moving_chunked(
    x: Tensor,
    v: Tensor,
    buffer: Tensor,
    f: Tensor,
    p: Tensor,
    q: Tensor,
    c: Tensor,
    inv: Tensor,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """`_step_moving` eagerly, chunk by chunk: the rows' largest magnitudes first, then the
    update."""
    rows = torch.zeros((x.shape[0], 1), dtype=torch.float64, device=x.device)
    scaled = torch.zeros((), dtype=torch.float64, device=x.device)
    for rs, cs in _blocks(*x.shape):
        args = (x[rs, cs], v[rs, cs], buffer[rs, cs], f[rs, cs], p, q, _rows(c, rs))
        part, big = _moving_rows(*args)
        rows[rs] = torch.maximum(rows[rs], part)
        scaled = torch.maximum(scaled, big)
    k = _shift_for(rows)
    position = _chunked(_shifted)(x, v, buffer, f, p, q, c, inv, dtype, k)
    return torch.maximum(rows.amax(), scaled), position, k


def _low_digits(buffer: Tensor, m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The shift that `_shifted` pushed onto ``buffer`` (float64), by ``m = 2**k``: the buffer
    below it and the low bits ``dx`` and ``dv`` that x and v dropped."""
    inv_m = 1.0 / m  # exact: a power of two
    upper = torch.floor(buffer * inv_m)
    rest = torch.floor(upper * inv_m)
    return rest, upper - rest * m, buffer - upper * m


def _unstep_position_moving(
    x: Tensor, v: Tensor, buffer: Tensor, m: Tensor, inv: Tensor, dtype: torch.dtype
) -> Tensor:
    """``x_n = x_{n+1} - v_{n+1}`` from the shifted ``x_{n+1}`` and ``v_{n+1}``, on the grid
    before the shift by ``m = 2**k`` (the low bits read from the buffer, which keeps them),
    written into ``x``; returns its float (``inv``: that grid's step)."""
    _, dx, dv = _low_digits(buffer.double(), m)
    new_x = (x.double() - v.double()) * m + (dx - dv)
    x.copy_(new_x)
    return (new_x * inv).to(dtype)


def _unstep_velocity_moving(
    x: Tensor,
    v: Tensor,
    buffer: Tensor,
    f: Tensor,
    p: Tensor,
    q: Tensor,
    c: Tensor,
    m: Tensor,
    m_below: Tensor,
) -> None:
    """`_unstep_velocity_narrow` on a moving grid: pops the shift ``m = 2**k`` of this layer
    (``v_{n+1}`` whole again), undoes the velocity update, and moves x one step ahead through the
    shift ``m_below`` of the layer below (its low bits read from the buffer, which keeps them
    until that layer pops them; 1 below block 0)."""
    new_v, new_buffer = _moving_velocity(v, buffer, f, p, q, c, m)
    _, dx, dv = _low_digits(new_buffer, m_below)
    v.copy_(new_v)
    buffer.copy_(new_buffer)
    x.copy_(_wrap32((x.double() - new_v) * m_below + (dx - dv)))


def _moving_velocity(
    v: Tensor, buffer: Tensor, f: Tensor, p: Tensor, q: Tensor, c: Tensor, m: Tensor
) -> tuple[Tensor, Tensor]:
    """`_narrow_velocity` on a moving grid: ``v_n`` and the buffer below it, from ``v_{n+1}``
    shifted by ``m = 2**k`` (whole again with the low bits that the buffer's top digits hold)."""
    rest, _, dv = _low_digits(_rowwise(buffer.double(), c), m)
    return _narrow_velocity(v.double() * m + dv, rest, f, p, q, c)


# -- x as a float32 and an int8 correction ---------------------------------------------------------
# Where x's int32 word converts to a normal float32 (its grid step is at least 2**-126, and
# |x| < 2**31 steps stays below float32's largest), that float is within 64 steps of x: x is the
# float, which the block takes as its input anyway, plus an int8 correction. The stack keeps x_N
# so (its float is the stack's output), and the backward x_n, one byte per element where the word
# takes four.


def _part(value: Tensor, scale: Tensor, inv: Tensor) -> tuple[Tensor, Tensor]:
    """The integer ``value`` (float64) as its float32 value and the int8 correction
    ``value - position * scale``."""
    position = (value * inv).float()
    return position, (value - position.double() * scale).to(torch.int8)


def _join(position: Tensor, correction: Tensor, scale: Tensor) -> Tensor:
    """The integer (float64) that ``position`` and ``correction`` stand for: `_part`'s inverse."""
    return position.double() * scale + correction.double()


def _correction(x: Tensor, position: Tensor, scale: Tensor) -> Tensor:
    """The int8 correction of int32 ``x`` beside ``position``, its float32 value as the forward's
    kernels round it (`_part`'s): ``x - position * scale``, exact in float64."""
    return (x.double() - position.double() * scale).to(torch.int8)


def _unstep_split(
    position: Tensor, correction: Tensor, v: Tensor, scale: Tensor, inv: Tensor
) -> Tensor:
    """``x <- x - v`` on ``x = position * scale + correction``: returns the new position, a new
    float32, and writes the new correction into ``correction``."""
    new, new_correction = _part(_join(position, correction, scale) - v.double(), scale, inv)
    correction.copy_(new_correction)
    return new


def _unstep_velocity_only(
    v: Tensor, buffer: Tensor, f: Tensor, p: Tensor, q: Tensor, c: Tensor
) -> None:
    """`_unstep_velocity_narrow` without moving ``x`` (held as a float and a correction)."""
    new_v, new_buffer = _narrow_velocity(v, buffer, f, p, q, c)
    v.copy_(new_v)
    buffer.copy_(new_buffer)


def _unstep_split_moving(
    position: Tensor,
    correction: Tensor,
    v: Tensor,
    buffer: Tensor,
    m: Tensor,
    scale: Tensor,
    inv: Tensor,
) -> Tensor:
    """`_unstep_split` on a moving grid: ``x_{n+1}`` (its float32 and int8 correction on the grid
    after the shift by ``m``, whose step is ``m`` times ``x_n``'s) and ``v_{n+1}`` whole again from
    the buffer's low bits (which it keeps), ``x_n = x_{n+1} - v_{n+1}`` on ``x_n``'s grid
    (``scale``, ``inv``): returns its float32 and writes its correction into ``correction``."""
    _, dx, dv = _low_digits(buffer.double(), m)
    x = (_join(position, correction, scale / m) - v.double()) * m + (dx - dv)
    new, new_correction = _part(x, scale, inv)
    correction.copy_(new_correction)
    return new


def _unstep_velocity_only_moving(
    v: Tensor, buffer: Tensor, f: Tensor, p: Tensor, q: Tensor, c: Tensor, m: Tensor
) -> None:
    """`_unstep_velocity_moving` without moving ``x`` (held as a float and a correction)."""
    new_v, new_buffer = _moving_velocity(v, buffer, f, p, q, c, m)
    v.copy_(new_v)
    buffer.copy_(new_buffer)


def _momentum_update(
    x: Tensor, v: Tensor, out: Tensor, gamma: Tensor, rest: Tensor, subtract: bool
) -> tuple[Tensor, Tensor]:
    """The float update of one block from its output, in one pass: ``f = out - x`` (``out``
    unless ``subtract``), ``v <- gamma v + rest f``, ``x <- x + v``, with ``gamma`` and ``rest =
    1 - gamma`` as 0-d tensors of the state's dtype. The operations and their order are those of
    the eager update, so on a CPU (where the compiled kernel contracts nothing into a fused
    multiply-add) its results are the eager update's, bit for bit."""
    f = out - x if subtract else out
    new_v = gamma * v + rest * f
    return x + new_v, new_v


def _momentum_update_(
    x: Tensor, v: Tensor, out: Tensor, gamma: Tensor, rest: Tensor, subtract: bool
) -> Tensor:
    """`_momentum_update` with the new ``v`` written into ``v`` (which the caller owns): one
    allocation, the new ``x``, which it returns."""
    f = out - x if subtract else out
    v.copy_(gamma * v + rest * f)
    return x + v


def _momentum_pullback(
    grad_x: Tensor | None,
    grad_v: Tensor | None,
    gamma: Tensor,
    rest: Tensor,
    subtract: bool,
    want_v: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """The pullback of `_momentum_update` in one pass, from the gradients of the new ``x`` and of
    the new ``v`` (at most one of them None: not used): those of ``x`` (None where nothing
    reaches it), ``v`` (None unless ``want_v``) and ``out``. Autograd's operations on the eager
    update, in its order (``a = dv + dx``, ``df = a rest``, ``dv_in = a gamma``, ``dx_in = dx -
    df`` where ``subtract``), so the same bits."""
    if grad_x is None or grad_v is None:
        a = grad_v if grad_x is None else grad_x
    else:
        a = grad_v + grad_x
    assert a is not None
    grad_f = a * rest
    grad_v_in = a * gamma if want_v else None
    if not subtract:
        return grad_x, grad_v_in, grad_f
    return (-grad_f if grad_x is None else grad_x - grad_f), grad_v_in, grad_f


CHUNK = 1 << 16  # elements per chunk of an eager kernel (512 KiB of int64 temporaries each)


def _blocks(rows: int, inner: int) -> Iterator[tuple[slice, slice]]:
    """Row and column slices of a ``(rows, inner)`` tensor, each of at most `CHUNK` elements."""
    if not rows or not inner:
        return
    rows_per, cols_per = max(1, CHUNK // inner), min(inner, CHUNK)
    for r in range(0, rows, rows_per):
        for col in range(0, inner, cols_per):
            yield slice(r, r + rows_per), slice(col, col + cols_per)


def _rows(t: Tensor, rs: slice) -> Tensor:
    """A per-row constant's rows ``rs`` (one shared row: itself)."""
    return t[rs] if t.shape[0] > 1 else t


def _cut(a: Any, shape: torch.Size, rs: slice, cs: slice) -> Any:
    """Argument ``a`` of a kernel over a ``shape`` state, for the chunk ``(rs, cs)``: a tensor of
    the state's shape is cut into the chunk, a per-row constant (``(rows, 1)``) into its rows;
    anything else (``(1, 1)`` and 0-d constants, dtypes, None) passes whole."""
    if not isinstance(a, Tensor) or a.dim() != 2:
        return a
    if a.shape == shape:
        return a[rs, cs]
    return _rows(a, rs)


def _chunked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run eagerly chunk by chunk: the same results, written into the same tensors, with
    temporaries of at most `CHUNK` elements. Its results of the state's shape are gathered into
    tensors of the whole, its 0-d ones (largest magnitudes) reduced by their maximum; None stays
    None. A state that is not ``(rows, inner)``, or is empty, goes in one piece."""

    def run(*args: Any) -> Any:
        x = args[0]
        if x.dim() != 2 or not x.numel():
            return fn(*args)
        whole: list[Any] = []
        single = False
        for rs, cs in _blocks(*x.shape):
            out = fn(*(_cut(a, x.shape, rs, cs) for a in args))
            single = not isinstance(out, tuple)
            parts = (out,) if single else out
            if not whole:
                whole = [
                    t
                    if t is None or t.dim() == 0
                    else torch.empty(x.shape, dtype=t.dtype, device=t.device)
                    for t in parts
                ]
            for k, t in enumerate(parts):
                if t is None:
                    continue
                if t.dim() == 0:
                    whole[k] = torch.maximum(whole[k], t)
                else:
                    whole[k][rs, cs] = t
        return whole[0] if single else tuple(whole)

    return run


def _round(
    t: Tensor, scale: Tensor, inv: Tensor, bound: float, word: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """``t`` (2-D) rounded onto the grid of per-row ``scale = 2**bits`` (``inv = 2**-bits``):
    the integers in ``word``, their value in ``t``'s dtype, and the largest magnitude in grid units
    (float64; NaN where ``t`` has one). NaN and inf round to zero, and magnitudes are clamped to
    ``bound``: `check_range` reports both from the largest. The value is exactly `to_float` of
    the integers: the rounded float64 values are the integers, and scaling by a power of two is
    exact."""
    scaled = t.double() * scale
    largest = scaled.abs().amax()
    scaled = scaled.nan_to_num(0.0, 0.0, 0.0).clamp(-bound, bound).round() + 0.0  # -0.0 is 0.0
    return scaled.to(word), (scaled * inv).to(t.dtype), largest


_LOW31 = (1 << 31) - 1


def _checksum(x: Tensor, v: Tensor) -> Tensor:
    """The sums of the low 31 bits and of the rest of ``x`` and ``v`` (int32 or int64; the same
    sums for the same values; no sum can overflow below 2**32 elements): one fused reduction when
    compiled, no temporaries."""
    parts = [(x & _LOW31).sum(), (x >> 31).sum(), (v & _LOW31).sum(), (v >> 31).sum()]
    return torch.stack(parts)


def _checksum_chunked(x: Tensor, v: Tensor) -> Tensor:
    """`_checksum` eagerly, in at most 64 chunks, so that its temporaries stay small beside the
    state (the backward checks at block 0, where its peak can be)."""
    x, v = x.reshape(-1), v.reshape(-1)
    sums = torch.zeros(4, dtype=torch.int64, device=x.device)
    size = max(CHUNK, -(-x.numel() // 64))  # x and v have the same size
    for start in range(0, x.numel(), size):
        sums += _checksum(x[start : start + size], v[start : start + size])
    return sums


def _checksum_split(position: Tensor, correction: Tensor, v: Tensor, scale: Tensor) -> Tensor:
    """`_checksum` of ``x = position * scale + correction`` (2-D, per-row ``scale``) and ``v``."""
    return _checksum(_join(position, correction, scale).long(), v)


def _checksum_split_chunked(
    position: Tensor, correction: Tensor, v: Tensor, scale: Tensor
) -> Tensor:
    """`_checksum_split` eagerly, chunk by chunk (`CHUNK` elements)."""
    sums = torch.zeros(4, dtype=torch.int64, device=v.device)
    for rs, cs in _blocks(*v.shape):
        args = (position[rs, cs], correction[rs, cs], v[rs, cs], _rows(scale, rs))
        sums += _checksum_split(*args)
    return sums


_MIN_COMPILED = 4096  # below this many elements, an integer kernel runs eagerly, for less


_F = TypeVar("_F", bound=Callable[..., Any])


def eager(fn: _F) -> _F:
    """``torch.compiler.disable``, typed: under ``torch.compile``, dynamo does not trace ``fn``
    (a graph break) and runs it as Python, where what it calls may still be compiled."""
    return cast(_F, torch.compiler.disable(fn))  # type: ignore[no-untyped-call]


class _Compiled:
    """``fn`` compiled on first use (for tensors of at least ``smallest`` elements, one
    dynamically shaped kernel per variant: the dtypes and ranks of the tensor arguments and the
    other arguments), or ``fn`` itself when compiling fails (after a warning).

    Each variant compiles a copy of ``fn`` with a code object of its own: dynamo keeps its cache,
    and counts its recompilations against ``recompile_limit`` (8), per code object, and the words,
    buffers and float dtypes of exact mode make more variants than that.
    """

    failed = False  # shared: one failure means the compiler is unavailable

    def __init__(
        self,
        fn: Callable[..., Any],
        fallback: Callable[..., Any] | None = None,
        smallest: int = _MIN_COMPILED,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.fn = fn
        self.options = options  # inductor's settings for this kernel
        self.fallback = fn if fallback is None else fallback  # uncompiled: the same results
        self.smallest = smallest  # fewer elements run the fallback
        self.variants: dict[tuple[Any, ...], Callable[..., Any]] = {}

    def _variant(self, key: tuple[Any, ...]) -> Callable[..., Any]:
        compiled = self.variants.get(key)
        if compiled is None:
            name = f"{self.fn.__name__}_{len(self.variants)}"
            code = self.fn.__code__.replace(co_name=name)  # a code object, and a cache, of its own
            copy = types.FunctionType(
                code, self.fn.__globals__, name, self.fn.__defaults__, self.fn.__closure__
            )
            compiled = torch.compile(copy, dynamic=True, fullgraph=True, options=self.options)
            self.variants[key] = compiled
        return compiled

    def __call__(self, *args: Any) -> Any:
        tensors = [a for a in args if isinstance(a, Tensor)]
        small = tensors[0].numel() < self.smallest
        # Under a Python dispatch mode, dynamo compiles nothing: eager for this call only.
        moded = torch._C._len_torch_dispatch_stack() > 0
        # Where autograd records (a double backward), eagerly: the compiled call detaches.
        records = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        if small or moded or records or _Compiled.failed or torch.compiler.is_compiling():
            return self.fallback(*args)
        # Plain tensors (a view would make dynamo guard on its base's shape) and no autograd
        # state in the guards.
        args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
        key = tuple((a.dtype, a.dim()) if isinstance(a, Tensor) else a for a in args)
        try:
            with torch.no_grad():
                return self._variant(key)(*args)
        except Exception as error:  # a missing compiler shows as many exception types
            _Compiled.failed = True
            warnings.warn(
                f"inertia exact mode: torch.compile failed ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}), so its integer arithmetic "
                "runs eagerly, with identical results, about 12 times slower.",
                RuntimeWarning,
                stacklevel=3,
            )
            return self.fallback(*args)


checksum = _Compiled(_checksum, _checksum_chunked)
# Four eager float operations cost less than a compiled call's overhead below 2**16 elements.
momentum_update = _Compiled(_momentum_update, smallest=1 << 16)
momentum_update_ = _Compiled(_momentum_update_, smallest=1 << 16)
momentum_pullback = _Compiled(_momentum_pullback, smallest=1 << 16)
convert = _Compiled(to_float, _chunked(to_float))
round_to_grid = _Compiled(_round, _chunked(_round))
step = _Compiled(_step, _chunked(_step))
step_push = _Compiled(_step_push, _chunked(_step_push))
unstep_position = _Compiled(_unstep_position, _chunked(_unstep_position))
# Where the new v goes both to v and into x, inductor would keep it in a temporary of the state's
# size (int64 or float64) between two loops, unless told that reading it again is cheap.
_ONE_PASS = {"realize_reads_threshold": 1 << 10}
unstep_velocity = _Compiled(_unstep_velocity, _chunked(_unstep_velocity), options=_ONE_PASS)
unstep_velocity_pop = _Compiled(
    _unstep_velocity_pop, _chunked(_unstep_velocity_pop), options=_ONE_PASS
)
step_narrow = _Compiled(_step_narrow, _chunked(_step_narrow))
unstep_velocity_narrow = _Compiled(
    _unstep_velocity_narrow, _chunked(_unstep_velocity_narrow), options=_ONE_PASS
)
step_moving = _Compiled(_step_moving, _step_moving_chunked)
unstep_position_moving = _Compiled(_unstep_position_moving, _chunked(_unstep_position_moving))
unstep_velocity_moving = _Compiled(
    _unstep_velocity_moving, _chunked(_unstep_velocity_moving), options=_ONE_PASS
)
correction = _Compiled(_correction, _chunked(_correction))
unstep_split = _Compiled(_unstep_split, _chunked(_unstep_split))
unstep_velocity_only = _Compiled(_unstep_velocity_only, _chunked(_unstep_velocity_only))
unstep_split_moving = _Compiled(_unstep_split_moving, _chunked(_unstep_split_moving))
unstep_velocity_only_moving = _Compiled(
    _unstep_velocity_only_moving, _chunked(_unstep_velocity_only_moving)
)
checksum_split = _Compiled(_checksum_split, _checksum_split_chunked)
