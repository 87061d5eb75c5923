"""Arithmetic of the momentum update, separated from the autograd machinery.

The memory-free Function only ever touches the state ``(x, v)`` through these methods, so another
representation (for example fixed point, where the inverse is bit-exact) plugs in by providing the
same methods. A state is a tuple of tensors: it is what the Function saves for backward.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from .._errors import InversionError, InversionWarning
from .kernels import momentum_pullback, momentum_update, momentum_update_

__all__ = ["Arithmetic", "Check", "FloatArithmetic", "State", "default_inversion_tol"]

State = tuple[Tensor, ...]


class Arithmetic(Protocol):
    """What the memory-free Function needs of a representation of ``(x, v)``.

    ``n`` is the index of the block among the stack's blocks.
    """

    gamma: float

    def on_grid(self, x: Tensor) -> Tensor:
        """``x`` as the blocks (and the init function) see it."""
        ...

    def encode(self, x: Tensor, v: Tensor | None) -> State:
        """Represent the initial position and velocity (None: zero)."""
        ...

    def position(self, state: State) -> Tensor:
        """The position ``x`` that the next block sees, as a floating-point tensor."""
        ...

    def velocity(self, state: State) -> Tensor:
        """The velocity ``v`` as a floating-point tensor."""
        ...

    def step(self, state: State, f: Tensor, n: int) -> State:
        """``v <- gamma v + (1 - gamma) f``, then ``x <- x + v``."""
        ...

    def step_output(self, state: State, out: Tensor, subtract: bool, n: int) -> State:
        """`step` from the block's output: ``f = out - x`` where ``subtract`` (a block that is
        not ``is_residual``), else ``f = out``."""
        ...

    def check_range(self) -> bool:
        """Raise if the steps since `encode` left the representable range; False if a NaN or inf
        made the state meaningless (`poisoned` then gives the state to return)."""
        ...

    def poisoned(self, state: State) -> State:
        """``state`` with NaN floats (their autograd history kept)."""
        ...

    def finish(self, state: State) -> State:
        """The final ``state`` as the memory-free stack keeps it until its backward; its
        `position` is the stack's output."""
        ...

    def saved(self, state: State) -> State:
        """The tensors that determine the final ``state`` (from `finish`), saved for the
        backward."""
        ...

    def restore(self, saved: State, owned: bool) -> State:
        """The state from `saved`'s tensors, for `unstep_position`. ``owned``: nothing reads them
        after this backward (no ``retain_graph``, no caller holds them), so it may write into
        them."""
        ...

    def unstep_position(self, state: State, n: int) -> State:
        """Undo block ``n``'s ``x <- x + v``: from ``(x_{n+1}, v_{n+1})`` to ``(x_n, v_{n+1})``."""
        ...

    def unstep_velocity(self, state: State, f: Tensor, n: int) -> State:
        """Undo the velocity update, given ``f = f_n(x_n)``: from ``v_{n+1}`` to ``v_n``."""
        ...

    def fingerprint(self, state: State) -> Tensor:
        """A few numbers that summarize ``(x, v)``, compared after the backward's inverse."""
        ...

    def verify(self, start: Tensor, state: State, check: Check) -> None:
        """Compare the forward's `fingerprint` with the rebuilt state's; warn or raise."""
        ...


@dataclass(frozen=True)
class Check:
    """The inversion check's settings, and what messages say about the stack."""

    mode: str  # "warn" or "raise"
    tol: float | None
    depth: int


class FloatArithmetic:
    """The momentum update in the tensor's own floating-point dtype.

    The inverse divides by ``gamma`` at every layer, so rounding error in the reconstruction grows
    like ``eps * gamma ** -depth``; `verify` compares random-projection sketches to detect when
    it matters.
    """

    def __init__(self, gamma: float) -> None:
        self.gamma = gamma
        # gamma and 1 - gamma as 0-d tensors, by dtype, for the fused update.
        self._scalars: dict[torch.dtype, tuple[Tensor, Tensor]] = {}
        self._zero: Tensor | None = None  # v_0 = 0 broadcast, set by `encode`
        # id of the v_0 that `encode` was given (the init function's output): the fused update
        # writes into every other velocity, which an earlier step made. An id, so that v_0 is not
        # kept alive (where it is freed, its id matching a later velocity costs one allocation).
        self._given: int | None = None

    def on_grid(self, x: Tensor) -> Tensor:
        return x

    def encode(self, x: Tensor, v: Tensor | None) -> State:
        if v is not None:
            self._given = id(v)
            return (x, v)
        # v_0 = 0 is one element broadcast (`velocity` gives it whole).
        self._zero = x.new_zeros(()).expand(x.shape)
        return (x, self._zero)

    def position(self, state: State) -> Tensor:
        return state[0]

    def velocity(self, state: State) -> Tensor:
        v = state[1]
        return torch.zeros_like(v) if v is self._zero else v

    def step(self, state: State, f: Tensor, n: int) -> State:
        return self.step_output(state, f, False, n)

    def step_output(self, state: State, out: Tensor, subtract: bool, n: int) -> State:
        """``v <- gamma v + (1 - gamma) f``, then ``x <- x + v``, with ``f = out - x`` where
        ``subtract``, else ``out``; written as the plain loop of a residual network, so that every
        mode rounds alike.

        On a CPU, in float32 or float64, for tensors of `2**16` elements and more, the update
        runs as one compiled pass with the eager update's roundings, which reads ``out`` itself.
        Without autograd (inference, and the memory-free forward) it writes the new ``v`` into
        the last one where that is the previous pass's, so that only the new ``x`` is allocated;
        where autograd records (``use_backprop=True``), it is one node whose backward is one
        compiled pass too, with autograd's roundings on the eager update: two passes over five
        tensors where the eager update and its backward make about ten over twenty-five."""
        x, v = state
        zero = v is self._zero
        if not (
            x.device.type == "cpu"
            and x.dtype == v.dtype == out.dtype
            and x.dtype in _FUSED_DTYPES
            and x.is_contiguous()
            and out.is_contiguous()
            and (zero or v.is_contiguous())
            and not torch.compiler.is_compiling()  # inside a compiled model: its own fusion
        ):
            f = out - x if subtract else out
            v = self.gamma * v + (1 - self.gamma) * f
            return (x + v, v)
        if x.dtype not in self._scalars:
            self._scalars[x.dtype] = (
                torch.tensor(self.gamma, dtype=x.dtype),
                torch.tensor(1 - self.gamma, dtype=x.dtype),
            )
        gamma, rest = self._scalars[x.dtype]
        if zero:  # v_0 = 0: a 0-d zero gives the same sums, with no tensor of zeros
            v = v.new_zeros(())
        if torch.is_grad_enabled() and (x.requires_grad or v.requires_grad or out.requires_grad):
            new_x, new_v = _FusedUpdate.apply(x, v, out, gamma, rest, subtract)
            return (new_x, new_v)
        if zero or id(v) == self._given:  # v_0: not the stack's to write into
            new_x, new_v = momentum_update(x, v, out, gamma, rest, subtract)
            return (new_x, new_v)
        return (momentum_update_(x, v, out, gamma, rest, subtract), v)

    def check_range(self) -> bool:
        return True  # float arithmetic carries NaN and inf itself

    def poisoned(self, state: State) -> State:
        return state

    def finish(self, state: State) -> State:
        return state

    def saved(self, state: State) -> State:
        return state

    def restore(self, saved: State, owned: bool) -> State:
        return tuple(saved)

    def unstep_position(self, state: State, n: int) -> State:
        x, v = state
        return (x - v, v)

    def unstep_velocity(self, state: State, f: Tensor, n: int) -> State:
        x, v = state
        # (v - (1 - gamma) * f) / gamma, rounded as the forward rounded (1 - gamma) * f: in f's
        # dtype, which autocast may make lower than v's. One allocation when the dtypes agree.
        t = f * (1 - self.gamma)
        t = torch.sub(v, t, out=t) if t.dtype == v.dtype else v - t
        return (x, t.div_(self.gamma))

    def fingerprint(self, state: State) -> Tensor:
        return _sketch(*state)

    def verify(self, start: Tensor, state: State, check: Check) -> None:
        x = state[0]
        if not bool(start.isfinite().all()):
            return  # a forward that met NaN or inf: its gradients are NaN too, as backprop's
        backward = _sketch(*state)
        diff = (backward[1:] - start[1:]).pow(2).sum() / _SKETCH_SIZE
        # Relative to the size of (x_0, v_0); absolute when both are zero (nothing to scale by).
        drift = float((diff / start[0] if start[0] > 0 else diff).sqrt())
        tol = check.tol if check.tol is not None else default_inversion_tol(x.dtype)
        if drift <= tol:  # False for NaN, so NaN is reported as drift
            return
        gamma, depth = self.gamma, check.depth
        eps = torch.finfo(x.dtype).eps
        log_growth = math.log2(eps) - depth * math.log2(gamma) if gamma > 0 else math.inf
        growth = 2**log_growth if log_growth < 1000 else math.inf  # no OverflowError
        message = (
            f"memory-free backward: the reconstructed input of this MomentumNet differs from the "
            f"forward's by about {drift:.1e} (relative), above inversion_tol={tol:.1e}, so its "
            f"gradients are off by a similar amount. Float rounding grows like eps * gamma**-depth "
            f"= {growth:.1e} here (gamma={gamma}, depth={depth}, {x.dtype}). Every block's "
            "gradients had already been accumulated when this was measured (at the end of the "
            "stack's backward). Use exact=True, a larger gamma, shorter stacks, float64, or "
            "use_backprop=True."
        )
        if check.mode == "raise":
            raise InversionError(message)
        warnings.warn(message, InversionWarning, stacklevel=2)


class _FusedUpdate(torch.autograd.Function):
    """The float update of one block from its output, ``(x, v, out) -> (x', v')``, as one autograd
    node: a compiled pass forward (`kernels.momentum_update`) and one backward
    (`kernels.momentum_pullback`). It saves nothing: the update is linear with constant
    coefficients."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, v: Tensor, out: Tensor, gamma: Tensor, rest: Tensor, subtract: bool
    ) -> tuple[Tensor, Tensor]:
        ctx.constants = gamma, rest, subtract
        ctx.set_materialize_grads(False)
        new_x, new_v = momentum_update(x, v, out, gamma, rest, subtract)
        return new_x, new_v

    @staticmethod
    def backward(ctx: Any, grad_x: Tensor | None, grad_v: Tensor | None) -> tuple[Any, ...]:
        gamma, rest, subtract = ctx.constants
        want_x, want_v, want_out = ctx.needs_input_grad[:3]
        if grad_x is None and grad_v is None:
            return (None,) * 6
        # One compiled pass; eager under create_graph, where autograd records it (`_Compiled`).
        grad_x_in, grad_v_in, grad_f = momentum_pullback(
            grad_x, grad_v, gamma, rest, subtract, want_v
        )
        return (
            grad_x_in if want_x else None,
            grad_v_in,
            grad_f if want_out else None,
            None,
            None,
            None,
        )


# Dtypes of the fused update: those whose eager update computes in the dtype itself (a 16-bit
# float's eager update rounds after each operation, which a fused kernel does not).
_FUSED_DTYPES = (torch.float32, torch.float64)
_SKETCH_SIZE = 4  # random projections per tensor in the inversion check
_SKETCH_SEED = 0x1A2B3C4D
_SKETCH_SAMPLE = 1 << 16  # elements of x and v sketched: a fixed random subsample


def _sketch(x: Tensor, v: Tensor) -> Tensor:
    """Random projections of ``x`` and ``v`` (same directions every call) and ``|x|^2 + |v|^2``.

    Large tensors are sketched on a random subsample of ``_SKETCH_SAMPLE`` elements, the same in
    forward and backward: float drift is amplified through every block, so it spreads over all
    elements, and the subsample measures it at a fixed cost (a full-size random projection of a
    ResNet stage's activations cost a quarter of a CPU training step). The subsample is drawn at
    random rather than strided, so that it does not align with the layout (a stride that is a
    multiple of ``H * W`` would read one pixel of every channel of an NCHW tensor).
    """
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    gen = torch.Generator(device=x.device)
    gen.manual_seed(_SKETCH_SEED)
    xf, vf = x.detach().reshape(-1), v.detach().reshape(-1)
    if x.numel() > _SKETCH_SAMPLE:
        index = torch.randint(x.numel(), (_SKETCH_SAMPLE,), generator=gen, device=x.device)
        xf, vf = xf[index], vf[index]
    xf, vf = xf.to(dtype), vf.to(dtype)
    with torch.autocast(x.device.type, enabled=False):  # full precision, whatever the caller's
        out = [xf.dot(xf) + vf.dot(vf)]
        for _ in range(_SKETCH_SIZE):
            g = torch.randn(xf.numel(), generator=gen, device=x.device, dtype=dtype)
            out += [xf.dot(g), vf.dot(g)]
    return torch.stack(out).double()


def default_inversion_tol(dtype: torch.dtype) -> float:
    """``sqrt(eps)`` of the dtype: half its digits (float32: 3.5e-4, float64: 1.5e-8)."""
    return math.sqrt(torch.finfo(dtype).eps)
