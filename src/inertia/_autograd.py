"""The momentum loop, its inverse, and the memory-free autograd Function.

What the memory-free Function keeps for backward (``ctx.save_for_backward``, so saved-tensor hooks
see all of it): the final state (``(x_N, v_N)`` in float mode; in exact mode also their fixed-point
integers and the buffer of bits lost to the multiplications by gamma, see `_exact`), the tensor
extra arguments, the generator state before each block that drew random numbers, and a fingerprint
of ``(x_0, v_0)`` (a few numbers). The stack's input is not saved. Memory for backward is therefore
constant in depth (plus one generator state per random block, and in exact mode
``log2(1 / gamma)`` bits per element per block). Backward walks the blocks in reverse; for block
``n`` it inverts ``x_n = x_{n+1} - v_{n+1}``, evaluates ``f_n(x_n)`` once with autograd
recording, and uses that one evaluation both to invert ``v_n = (v_{n+1} - (1 - gamma) f_n(x_n)) /
gamma`` and for the vector-Jacobian product. Peak memory in backward is one block's activations.

Adjoints, with ``a = dL/dx_{n+1} + dL/dv_{n+1}``::

    dL/dv_n      = gamma * a
    dL/dx_n      = dL/dx_{n+1} + J_{f_n}(x_n)^T (1 - gamma) a
    dL/dtheta_n += J_{f_n}(theta_n)^T (1 - gamma) a
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from ._arith import Arithmetic, Check, State
from ._errors import InertiaError
from ._kernels import eager
from ._replay import AutocastState, RngTracker, frozen_running_stats, same_state

__all__ = ["StackSpec", "inverse", "momentum_forward"]

_INIT = -1  # call index of the init function, so blocks keep their own indices
_TENSOR = object()  # placeholder for a tensor among the extra arguments' pytree leaves


@dataclass(frozen=True)
class StackSpec:
    """Non-tensor description of a momentum stack, built by `MomentumNet` for each call."""

    blocks: tuple[nn.Module, ...]
    init_function: nn.Module | None
    arith: Arithmetic
    is_residual: bool
    check_inversion: str | None = "warn"
    inversion_tol: float | None = None
    first_index: int = 0  # index of blocks[0] among the module's children, for messages
    # Accept blocks that return a tuple whose first element is the new x (HuggingFace layers
    # before transformers 5); `seen["tuple"]` then records that they did.
    unpack_tuples: bool = False
    seen: dict[str, bool] = field(default_factory=dict, compare=False)

    def unpack(self, out: Any) -> Any:
        is_tuple = isinstance(out, (tuple, list)) and bool(out) and isinstance(out[0], Tensor)
        if self.unpack_tuples and is_tuple:
            self.seen["tuple"] = True
            return out[0]
        return out

    def describe(self, index: int) -> str:
        if index == _INIT:
            return f"init_function ({type(self.init_function).__name__})"
        return f"block {index + self.first_index} ({type(self.blocks[index]).__name__})"


def call_block(
    spec: StackSpec, index: int, x: Tensor, args: Sequence[Any], kwargs: dict[str, Any]
) -> Tensor:
    """Evaluate ``f_index(x)`` (or ``v_0 = init_function(x)``) and check what it did to ``x``."""
    module = spec.init_function if index == _INIT else spec.blocks[index]
    assert module is not None
    version = None if x.is_inference() else x._version  # inference tensors have no counter
    out = module(x) if index == _INIT else module(x, *args, **kwargs)
    if version is not None and x._version != version:
        raise InertiaError(
            f"{spec.describe(index)} modified its input in place; the momentum update needs "
            "x unchanged. Use out-of-place operations in the block (for example "
            "nn.ReLU(inplace=False), or `y = x + h` instead of `x += h`)."
        )
    out = spec.unpack(out)
    if not isinstance(out, Tensor):
        raise InertiaError(
            f"{spec.describe(index)} returned {type(out).__name__}; a momentum block must "
            "return one tensor of its input's shape."
        )
    if out.shape != x.shape:
        raise InertiaError(
            f"{spec.describe(index)} maps shape {tuple(x.shape)} to {tuple(out.shape)}; a "
            "momentum block must keep its input's shape. Keep shape-changing layers outside the "
            "MomentumNet (for example in an nn.Sequential around it)."
        )
    if index == _INIT or spec.is_residual:
        return out
    return out - x


def run_forward(
    spec: StackSpec,
    x: Tensor,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    rng: RngTracker | None = None,
    sketch: bool = False,
) -> tuple[State, dict[int, tuple[Tensor, ...]], Tensor | None]:
    """The momentum loop.

    With ``rng``, also return the generator state before each call that drew random numbers (keyed
    by call index); with ``sketch``, a sketch of ``(x_0, v_0)`` for the inversion check.
    """
    replay: dict[int, tuple[Tensor, ...]] = {}
    current = rng.get_state() if rng is not None else ()

    def call(index: int, inp: Tensor) -> Tensor:
        nonlocal current
        out = call_block(spec, index, inp, args, kwargs)
        if rng is not None:
            after = rng.get_state()
            if not same_state(current, after):
                replay[index] = current
            current = after
        return out

    arith = spec.arith
    v = call(_INIT, arith.on_grid(x)) if spec.init_function is not None else None
    state = arith.encode(x, v)
    start = arith.fingerprint(state) if sketch else None
    for n in range(len(spec.blocks)):
        state = arith.step(state, call(n, arith.position(state)), n)
    arith.check_range()
    return state, replay, start


def inverse(spec: StackSpec, state: State, args: Sequence[Any], kwargs: dict[str, Any]) -> State:
    """Reconstruct the state of ``(x_0, v_0)`` from that of ``(x_N, v_N)`` without autograd."""
    arith = spec.arith
    with torch.no_grad():
        for n in reversed(range(len(spec.blocks))):
            state = arith.unstep_position(state)
            f = call_block(spec, n, arith.position(state), args, kwargs)
            state = arith.unstep_velocity(state, f, n)
        return state


@dataclass(frozen=True)
class _Config:
    """What `_MomentumFunction` needs besides tensors."""

    spec: StackSpec
    treespec: pytree.TreeSpec
    # Leaves of the extra arguments, with _TENSOR where a tensor input of the Function goes.
    leaves: tuple[Any, ...]
    n_tensors: int  # how many of the Function's inputs after x are extra-argument tensors
    call_params: tuple[tuple[int, ...], ...]  # for call index i, at i + 1: positions in the params

    def unflatten(self, tensors: Sequence[Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        it = iter(tensors)
        leaves = [next(it) if leaf is _TENSOR else leaf for leaf in self.leaves]
        args, kwargs = pytree.tree_unflatten(leaves, self.treespec)
        return tuple(args), dict(kwargs)


class _MomentumFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, cfg: _Config, x: Tensor, *tensors: Tensor) -> State:
        arg_tensors = tensors[: cfg.n_tensors]
        args, kwargs = cfg.unflatten(arg_tensors)
        rng = RngTracker(x.device)
        check = cfg.spec.check_inversion is not None
        state, replay, sketch = run_forward(cfg.spec, x, args, kwargs, rng, sketch=check)
        ctx.cfg = cfg
        ctx.rng = rng
        ctx.autocast = AutocastState.capture(x.device)
        ctx.n_state = len(state)
        ctx.replay_keys = tuple(sorted(replay))
        rng_tensors = [t for k in ctx.replay_keys for t in replay[k]]
        ctx.save_for_backward(
            *state, *arg_tensors, *rng_tensors, *([sketch] if sketch is not None else [])
        )
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*(t for t in state if not t.is_floating_point()))
        return tuple(state)

    @staticmethod
    def backward(
        ctx: Any, grad_x: Tensor | None, grad_v: Tensor | None, *int_grads: Any
    ) -> tuple[Any, ...]:
        if torch.is_grad_enabled():
            raise InertiaError(
                "double backward (create_graph=True) is not supported by the memory-free "
                "MomentumNet; construct it with use_backprop=True for higher-order gradients."
            )
        cfg: _Config = ctx.cfg
        spec, arith = cfg.spec, cfg.spec.arith
        saved = ctx.saved_tensors
        state: State = saved[: ctx.n_state]
        arg_tensors = saved[ctx.n_state : ctx.n_state + cfg.n_tensors]
        rest = saved[ctx.n_state + cfg.n_tensors :]
        k = ctx.rng.n_states
        replay = {key: rest[i * k : (i + 1) * k] for i, key in enumerate(ctx.replay_keys)}
        sketch = rest[len(replay) * k :]
        needs = ctx.needs_input_grad  # (cfg, x, *extra-argument tensors, *params)

        # Extra arguments are detached once and shared by every recomputation.
        arg_in = [t.detach().requires_grad_(needs[2 + i]) for i, t in enumerate(arg_tensors)]
        args, kwargs = cfg.unflatten(arg_in)
        grads = _Gradients(cfg, ctx, arg_in, n_params=len(needs) - 2 - cfg.n_tensors)

        gx = grad_x if grad_x is not None else torch.zeros_like(arith.position(state))
        gv = grad_v if grad_v is not None else torch.zeros_like(arith.velocity(state))
        # The incoming gradients belong to autograd; once replaced, ours are updated in place (the
        # same arithmetic as out of place, without an allocation per block).
        owned = False
        with ctx.rng.fork() if replay else contextlib.nullcontext():
            for n in reversed(range(len(spec.blocks))):
                state = arith.unstep_position(state)
                a = gv.add_(gx) if owned else gx + gv
                f, dx = grads.recompute(n, arith.position(state), args, kwargs, a, replay)
                state = arith.unstep_velocity(state, f, n)
                gv = a.mul_(arith.gamma)
                if dx is not None:
                    gx = gx.add_(dx) if owned else gx + dx
                owned = owned or dx is not None
            if spec.init_function is not None:
                _, dx = grads.recompute(_INIT, arith.position(state), args, kwargs, gv, replay)
                if dx is not None:
                    gx = gx + dx
        if sketch:
            assert spec.check_inversion is not None
            check = Check(spec.check_inversion, spec.inversion_tol, len(spec.blocks))
            arith.verify(sketch[0], state, check)
        return (None, gx if needs[1] else None, *grads.args, *grads.params)


class _Gradients:
    """Recomputes one call at a time and accumulates parameter and extra-argument gradients."""

    def __init__(self, cfg: _Config, ctx: Any, arg_in: list[Tensor], n_params: int) -> None:
        self.cfg, self.ctx, self.arg_in = cfg, ctx, arg_in
        self.args: list[Tensor | None] = [None] * len(arg_in)
        self.params: list[Tensor | None] = [None] * n_params

    def recompute(
        self,
        index: int,
        x: Tensor,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        adjoint: Tensor,
        replay: dict[int, tuple[Tensor, ...]],
    ) -> tuple[Tensor, Tensor | None]:
        """Evaluate call ``index`` at ``x`` once, as its forward did, and pull back ``adjoint``.

        ``adjoint`` is the gradient of the call's contribution to the velocity: for a block,
        ``dL/dv_{n+1}`` (the block's output enters scaled by ``1 - gamma``); for the init
        function, ``dL/dv_0``. Returns the detached output and the gradient with respect to ``x``
        (None where ``x``'s gradient is not needed or does not depend on it).
        """
        spec, ctx = self.cfg.spec, self.ctx
        module = spec.init_function if index == _INIT else spec.blocks[index]
        assert module is not None
        wanted = [p for p in module.parameters() if p.requires_grad]
        positions = self.cfg.call_params[index + 1]
        if len(wanted) != len(positions):
            raise InertiaError(
                f"{spec.describe(index)}: parameters changed requires_grad between forward "
                "and backward; set requires_grad before the forward pass."
            )
        need_x = index > 0 or ctx.needs_input_grad[1]
        if index in replay:
            ctx.rng.set_state(replay[index])
        # Norm layers' running statistics are restored after the VJP, which may read them.
        with frozen_running_stats(module):
            with torch.enable_grad(), ctx.autocast.enter():
                inp = x.detach().requires_grad_(need_x)
                out = call_block(spec, index, inp, args, kwargs)
            # As autograd differentiates `gamma * v + (1 - gamma) * f`: cast first, then scale.
            grad_out = adjoint.to(out.dtype)
            if index != _INIT:
                grad_out = grad_out * (1 - spec.arith.gamma)
            arg_wanted = [i for i, t in enumerate(self.arg_in) if t.requires_grad]
            inputs = ([inp] if need_x else []) + wanted + [self.arg_in[i] for i in arg_wanted]
            if not inputs or not out.requires_grad:
                return out.detach(), None
            if _sharded(module):
                return out.detach(), self._backward_sharded(out, grad_out, inp, need_x, arg_wanted)
            pulled = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
        dx = pulled[0] if need_x else None
        rest = pulled[1:] if need_x else pulled
        for pos, g in zip(positions, rest[: len(wanted)], strict=True):
            self.params[pos] = _add(self.params[pos], g)
        for i, g in zip(arg_wanted, rest[len(wanted) :], strict=True):
            self.args[i] = _add(self.args[i], g)
        return out.detach(), dx

    def _backward_sharded(
        self, out: Tensor, grad_out: Tensor, inp: Tensor, need_x: bool, arg_wanted: list[int]
    ) -> Tensor | None:
        """The pullback of a block that FSDP2 shards (``fully_shard`` on it or inside it).

        FSDP2 registers the unsharded parameters for the duration of the block's call only, and
        reduce-scatters their gradients itself once autograd has accumulated them (its hooks on
        the call's inputs and outputs). So this pullback runs ``backward`` instead of asking for
        the parameters' gradients: FSDP reduce-scatters into the sharded ``.grad``, any parameter
        it does not manage accumulates its ``.grad`` directly, and the Function returns None for
        both. The inputs' gradients are read back from the detached leaves.
        """
        for i in arg_wanted:  # shared by every block's call: start from zero, read, clear
            self.arg_in[i].grad = None
        torch.autograd.backward(out, grad_out)
        for i in arg_wanted:
            self.args[i] = _add(self.args[i], self.arg_in[i].grad)
            self.arg_in[i].grad = None
        return inp.grad if need_x else None


def _sharded(module: nn.Module) -> bool:
    """Whether FSDP2 (``fully_shard``) manages ``module`` or one of its submodules."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # nothing is sharded if it was never imported
    return fsdp is not None and any(isinstance(m, fsdp.FSDPModule) for m in module.modules())


def _add(total: Tensor | None, g: Tensor | None) -> Tensor | None:
    """Out of place: a gradient returned by autograd may alias another one."""
    if g is None:
        return total
    return g if total is None else total + g


def _is_cache(value: Any) -> bool:
    """Duck-typed key/value cache (HuggingFace's Cache classes)."""
    return hasattr(value, "update") and hasattr(value, "get_seq_length")


def _unique_trainable(
    modules: Sequence[nn.Module | None],
) -> tuple[list[Tensor], list[tuple[int, ...]]]:
    """Parameters requiring grad, each once, and for each module their positions in that list."""
    params: list[Tensor] = []
    where: dict[int, int] = {}
    positions = []
    for module in modules:
        own = [] if module is None else [p for p in module.parameters() if p.requires_grad]
        for p in own:
            if id(p) not in where:
                where[id(p)] = len(params)
                params.append(p)
        positions.append(tuple(where[id(p)] for p in own))
    return params, positions


def momentum_forward(
    spec: StackSpec,
    x: Tensor,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    *,
    memory_free: bool,
) -> State:
    """Run the stack: memory-free when asked and when autograd has something to differentiate."""
    params, positions = _unique_trainable((spec.init_function, *spec.blocks))
    leaves, treespec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    arg_tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
    differentiable = torch.is_grad_enabled() and (
        x.requires_grad or bool(params) or any(t.requires_grad for t in arg_tensors)
    )
    if not (memory_free and differentiable and spec.blocks):
        state, _, _ = run_forward(spec, x, args, kwargs)
        return state
    named = [(f"positional argument {i + 1} after x", a) for i, a in enumerate(args)]
    for name, value in [*named, *((f"argument {k!r}", v) for k, v in kwargs.items())]:
        if _is_cache(value):
            raise InertiaError(
                f"{name} is a {type(value).__name__}, a key/value cache that each "
                "block updates; the memory-free backward runs every block again and would update "
                "it twice. Pass use_cache=False when training memory-free (generation under "
                "torch.no_grad() or in eval mode with no_grad works, as it runs no backward)."
            )
    cfg = _Config(
        spec=spec,
        treespec=treespec,
        leaves=tuple(_TENSOR if isinstance(leaf, Tensor) else leaf for leaf in leaves),
        n_tensors=len(arg_tensors),
        call_params=tuple(positions),
    )
    return _apply(cfg, x, [*arg_tensors, *params])


# The memory-free Function keeps generator states and an inversion sketch, which dynamo cannot
# trace, and its blocks must run alike in the forward and the recomputation: `torch.compile` on a
# whole model stops here (one graph break) and compiles the layers around the stack; blocks
# compiled themselves (`block.compile()`) still run compiled inside it.
@eager
def _apply(cfg: _Config, x: Tensor, tensors: list[Tensor]) -> State:
    return tuple(_MomentumFunction.apply(cfg, x, *tensors))
