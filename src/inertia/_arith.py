"""Arithmetic of the momentum update, separated from the autograd machinery.

The memory-free Function only ever touches the state ``(x, v)`` through these methods, so another
representation (for example fixed point, where the inverse is bit-exact) plugs in by providing the
same methods. A state is a tuple of tensors: it is what the Function saves for backward.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

__all__ = ["Arithmetic", "FloatArithmetic", "State"]

State = tuple[Tensor, ...]


class Arithmetic(Protocol):
    """What the memory-free Function needs of a representation of ``(x, v)``."""

    gamma: float

    def encode(self, x: Tensor, v: Tensor) -> State:
        """Represent the initial position and velocity."""
        ...

    def position(self, state: State) -> Tensor:
        """The position ``x`` that the next block sees, as a floating-point tensor."""
        ...

    def velocity(self, state: State) -> Tensor:
        """The velocity ``v`` as a floating-point tensor."""
        ...

    def step(self, state: State, f: Tensor) -> State:
        """``v <- gamma v + (1 - gamma) f``, then ``x <- x + v``."""
        ...

    def unstep_position(self, state: State) -> State:
        """Undo ``x <- x + v``: from ``(x_{n+1}, v_{n+1})`` to ``(x_n, v_{n+1})``."""
        ...

    def unstep_velocity(self, state: State, f: Tensor) -> State:
        """Undo the velocity update, given ``f = f_n(x_n)``: from ``v_{n+1}`` to ``v_n``."""
        ...


class FloatArithmetic:
    """The momentum update in the tensor's own floating-point dtype.

    The inverse divides by ``gamma`` at every layer, so rounding error in the reconstruction grows
    like ``eps * gamma ** -depth``; the Function's ``check_inversion`` sketch detects when it
    matters.
    """

    def __init__(self, gamma: float) -> None:
        self.gamma = gamma

    def encode(self, x: Tensor, v: Tensor) -> State:
        return (x, v)

    def position(self, state: State) -> Tensor:
        return state[0]

    def velocity(self, state: State) -> Tensor:
        return state[1]

    def step(self, state: State, f: Tensor) -> State:
        x, v = state
        # Written exactly as the plain loop of `MomentumNet` so both modes round identically.
        v = self.gamma * v + (1 - self.gamma) * f
        return (x + v, v)

    def unstep_position(self, state: State) -> State:
        x, v = state
        return (x - v, v)

    def unstep_velocity(self, state: State, f: Tensor) -> State:
        x, v = state
        # (v - (1 - gamma) * f) / gamma, rounded as the forward rounded (1 - gamma) * f: in f's
        # dtype, which autocast may make lower than v's. One allocation when the dtypes agree.
        t = f * (1 - self.gamma)
        t = torch.sub(v, t, out=t) if t.dtype == v.dtype else v - t
        return (x, t.div_(self.gamma))
