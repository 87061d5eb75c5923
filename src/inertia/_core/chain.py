"""The momentum loop, its inverse, and the memory-free backward: one autograd node per block.

The memory-free forward (`momentum_forward` with ``memory_free=True``) runs the loop once inside
the node ``_Start`` and keeps no graph: each block runs as its recomputation will (autograd
recording, the input requiring grad as it will then, the graph dropped at once), and what it used
is recorded: its parameter and buffer tensors, the buffers it mutated as they were before, and the
generator state if it drew random numbers. One ``_Block`` node per block, and ``_Finish`` after
them, then link the graph ``x -> _Start -> _Block_0 -> ... -> _Block_{N-1} -> _Finish -> (x_N,
v_N)``; between nodes travel tensors of the state's shape whose storage is one element, so that
autograd hands each node full-size gradients. Saved for backward (``ctx.save_for_backward``, so
that saved-tensor hooks see it and version counters guard it): by ``_Finish``, the final state
(``(x_N, v_N)`` in float mode, ``x_N`` being the output; in exact mode the fixed-point integers
and buffer of bits lost to gamma, see `exact`, with ``x_N`` as the output and a one-byte
correction in a float32 stack); by each ``_Block``, its block's parameters, its buffers (mutated
ones as the forward saw them), its generator state, the extra arguments; by the first, a
fingerprint of ``(x_0, v_0)``. Memory for backward is therefore constant in depth, plus what
blocks keep themselves (one generator state per random block; in exact mode ``log2(1 / gamma)``
bits per element per block).

Backward: autograd runs ``_Finish, _Block_{N-1}, ..., _Block_0, _Start``. ``_Finish`` hands its
saved state down and passes the caller's gradients on, so that autograd frees its saved tensors
before ``_Block_{N-1}`` runs. Node ``n`` receives the gradients of ``(x_{n+1}, v_{n+1})`` from
autograd and the state ``(x_{n+1}, v_{n+1})`` from the node above, inverts ``x_n = x_{n+1} -
v_{n+1}``, evaluates ``f_n(x_n)`` once with autograd recording and with what the forward used (the
same parameter tensors, bound in place of the live ones; the buffers as they were; the generator
replayed; autocast re-entered), uses that evaluation both to invert ``v_n = (v_{n+1} - (1 -
gamma) f_n(x_n)) / gamma`` and for the vector-Jacobian product, hands ``(x_n, v_n)`` down and
returns the gradients of ``x_n``, ``v_n``, its parameters and the extra arguments. Parameter
gradients thus leave block by block through autograd's own accumulation (``.grad`` in place,
DDP's hooks per block). The gradients that a node hands down are tensors it allocated, with no
other consumer, so the node below computes its own into them in place; for a block that is not
``is_residual``, ``f = out - x`` is differentiated as ``J_out^T g - g`` outside the graph. At the
peak of the backward, beside the state (float: ``x_n`` and ``v_n``; exact: ``v_n``'s int32 word
and the buffer, which the nodes rewrite in place, and ``x_n`` as the block's float input and an
int8 correction in a float32 stack, else in its word), live one block's recomputation and at most
six tensors of the state's size in its dtype in exact mode (at the last block, whose incoming
gradient is the caller's and is not written into: that gradient, the adjoint, the block's input,
its gradient from the pullback, and the gradients handed down; the float of ``x_{n-1}`` is made
after the block's pullback); float mode: seven, the state among them, and at block 0 the
inversion check's random direction where the state has fewer than 2**16 elements; no integer or
float64 tensor of the state's size (`tests/test_memory.py`, with
`inertia.testing.LiveTensorMeter`). Where exact mode's forward met a NaN or inf, its output is NaN
and every node returns NaN gradients, rebuilding nothing (``GradScaler`` then skips the step).

Adjoints, with ``a = dL/dx_{n+1} + dL/dv_{n+1}``::

    dL/dv_n      = gamma * a
    dL/dx_n      = dL/dx_{n+1} + J_{f_n}(x_n)^T (1 - gamma) a
    dL/dtheta_n  = J_{f_n}(theta_n)^T (1 - gamma) a
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .._errors import InertiaError
from .arith import Arithmetic, Check, State
from .exact import WordOverflow
from .kernels import eager
from .replay import (
    AutocastState,
    GeneratorWatch,
    RngTracker,
    checkpointed_call,
    frozen_running_stats,
    replaying,
    running_statistics,
    same_state,
)

__all__ = ["StackSpec", "inverse", "momentum_forward", "records_autograd"]

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

    def module(self, index: int) -> nn.Module:
        module = self.init_function if index == _INIT else self.blocks[index]
        assert module is not None
        return module

    def describe(self, index: int) -> str:
        if index == _INIT:
            return f"init_function ({type(self.init_function).__name__})"
        return f"block {index + self.first_index} ({type(self.blocks[index]).__name__})"


def call_block(
    spec: StackSpec,
    index: int,
    x: Tensor,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    call: Callable[..., Any] | None = None,
    subtract: bool = True,
) -> Tensor:
    """Evaluate ``f_index(x)`` (or ``v_0 = init_function(x)``) and check what it did to ``x``.

    ``call`` runs the module (default: calling it); the recomputation passes one that binds the
    tensors the forward used. A block that is not ``is_residual`` returns ``x + f(x)``: ``f`` is
    that minus ``x``, unless ``subtract`` is False (the block's output is returned).
    """
    module = spec.module(index)
    run = module if call is None else call
    version = None if x.is_inference() else x._version  # inference tensors have no counter
    in_place = InertiaError(
        f"{spec.describe(index)} modified its input in place; the momentum update needs "
        "x unchanged. Use out-of-place operations in the block (for example "
        "nn.ReLU(inplace=False), or `y = x + h` instead of `x += h`)."
    )
    try:
        out = run(x) if index == _INIT else run(x, *args, **kwargs)
    except RuntimeError as error:  # autograd's own refusal, where x requires grad
        if x.requires_grad and "in-place operation" in str(error):
            raise in_place from error
        raise
    if version is not None and x._version != version:
        raise in_place
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
    if index == _INIT or spec.is_residual or not subtract:
        return out
    return out - x


def run_forward(
    spec: StackSpec,
    x: Tensor,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    checkpointed: bool = False,
) -> State:
    """The momentum loop, as autograd records it (backprop; each block under
    ``torch.utils.checkpoint`` where ``checkpointed``) or without autograd."""
    arith = spec.arith
    v = call_block(spec, _INIT, arith.on_grid(x), args, kwargs) if spec.init_function else None
    state = arith.encode(x, v)
    subtract = not spec.is_residual
    for n in range(len(spec.blocks)):
        call = checkpointed_call(spec.module(n)) if checkpointed else None
        out = call_block(spec, n, arith.position(state), args, kwargs, call, subtract=False)
        state = arith.step_output(state, out, subtract, n)
    return state if arith.check_range() else arith.poisoned(state)


def inverse(spec: StackSpec, state: State, args: Sequence[Any], kwargs: dict[str, Any]) -> State:
    """Reconstruct the state of ``(x_0, v_0)`` from that of ``(x_N, v_N)`` without autograd."""
    arith = spec.arith
    with torch.no_grad():
        for n in reversed(range(len(spec.blocks))):
            state = arith.unstep_position(state, n)
            f = call_block(spec, n, arith.position(state), args, kwargs)
            state = arith.unstep_velocity(state, f, n)
        return state


# -- what a call used --------------------------------------------------------------------------


@dataclass
class _Record:
    """What one call (a block, or the init function) used in the forward, but its tensors.

    The tensors, saved by the call's node, are in order the parameters (``params`` names), the
    buffers (``buffers`` names; for those in ``mutated``, a copy made before the call), the
    default generators' state before the call if it drew from them (``n_rng`` tensors), and the
    state of each of ``generators`` (generators of the block's own, passed as ``generator=``)
    before its first use in the call. The node's backward gets them back from autograd, which
    checks that no parameter changed in place meanwhile.
    """

    params: tuple[str, ...]
    trainable: tuple[str, ...]  # the parameters that required grad in the forward
    buffers: tuple[str, ...]
    mutated: frozenset[str]
    n_rng: int  # generator-state tensors at the end of `tensors` (0: the call drew none)
    need_x: bool  # whether the input required grad (the recomputation does the same)
    sharded: bool  # FSDP2 manages the module: it runs on its live parameters
    # The module's submodules with their names (every occurrence), and each one's ``training``
    # flag in the forward.
    modules: tuple[tuple[str, nn.Module], ...]
    training: tuple[bool, ...]
    generators: tuple[torch.Generator, ...]

    @property
    def n_tensors(self) -> int:
        return len(self.params) + len(self.buffers) + self.n_rng + len(self.generators)

    def unpack(
        self, saved: Sequence[Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Parameters and buffers by name, default generators' state, own generators' states."""
        n_p, n_b = len(self.params), len(self.buffers)
        params = dict(zip(self.params, saved[:n_p], strict=True))
        buffers = dict(zip(self.buffers, saved[n_p : n_p + n_b], strict=True))
        rng = tuple(saved[n_p + n_b : n_p + n_b + self.n_rng])
        return params, buffers, rng, tuple(saved[n_p + n_b + self.n_rng :])


def _input(x: Tensor, need: bool) -> Tensor:
    """A fresh leaf aliasing ``x`` (a call's input), requiring grad if ``need``."""
    return x.detach().requires_grad_(need)


def _discard(tensor: Tensor) -> None:
    """Pack hook of the forward's throwaway graphs: keep nothing."""


def _unreachable(packed: None) -> Tensor:
    """Unpack hook of the forward's throwaway graphs: reached only through a block's own output,
    captured before the stack detached it (a forward hook, HuggingFace's hidden states)."""
    raise InertiaError(
        "a loss was differentiated through a tensor that a block of a memory-free stack produced "
        "in the forward (captured by a forward hook, or HuggingFace's output_hidden_states or "
        "output_attentions): the stack keeps no graph through its blocks. Compute the loss from "
        "the stack's output, or train this stack with use_backprop=True."
    )


def _sharded(modules: Iterable[nn.Module]) -> bool:
    """Whether FSDP2 (``fully_shard``) manages one of ``modules`` (a module and its submodules)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # nothing is sharded if it was never imported
    return fsdp is not None and any(isinstance(m, fsdp.FSDPModule) for m in modules)


def _named(modules: Sequence[tuple[str, nn.Module]], table: str) -> dict[str, Tensor]:
    """The parameters (``table="_parameters"``) or buffers (``"_buffers"``) of ``modules`` (a
    module's ``named_modules(remove_duplicate=False)``) by name, each tensor once, under its first
    name: ``named_parameters()`` and ``named_buffers()`` in one pass over a walk already made."""
    named: dict[str, Tensor] = {}
    seen: set[int] = set()
    for prefix, m in modules:
        for attr, t in getattr(m, table).items():
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                named[f"{prefix}.{attr}" if prefix else attr] = t
    return named


def communicates(blocks: Sequence[nn.Module]) -> bool:
    """Whether a block's forward may run a collective (FSDP2's all-gather, SyncBatchNorm's
    statistics, a DTensor's redistribution): such a forward cannot run again on one rank alone,
    so a stack of them does not use int32 words, which rerun the forward where they overflow."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    dtensor = sys.modules.get("torch.distributed.tensor")
    for block in blocks:
        if _sharded(block.modules()) or any(
            isinstance(m, nn.SyncBatchNorm) for m in block.modules()
        ):
            return True
        if dtensor is not None and any(isinstance(p, dtensor.DTensor) for p in block.parameters()):
            return True
    return False


def _record_call(
    spec: StackSpec,
    index: int,
    x: Tensor,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    rng: RngTracker,
    need_x: bool,
) -> tuple[Tensor, _Record, tuple[Tensor, ...]]:
    """Run one call of the memory-free forward as its recomputation will run; returns its output,
    its record and the record's tensors."""
    module = spec.module(index)
    modules = tuple(module.named_modules(remove_duplicate=False))
    sharded = _sharded(m for _, m in modules)
    params: dict[str, Tensor] = _named(modules, "_parameters")
    buffers = _named(modules, "_buffers")
    before = {name: b.clone() for name, b in buffers.items()}
    versions = {name: b._version for name, b in buffers.items()}
    training = tuple(m.training for _, m in modules)
    statistics = running_statistics(module, modules)
    state = rng.get_state()
    watch = GeneratorWatch()
    # The recomputation records autograd with the input requiring grad as here: kernels that
    # choose on either (attention backends, fused fast paths) then compute the same values. The
    # graph is dropped at once, so it saves nothing (nor do the caller's saved-tensor hooks see
    # it). FSDP2 blocks run without autograd (their hooks expect a backward for every recorded
    # call).
    with contextlib.ExitStack() as stack:
        if not sharded:
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(_discard, _unreachable))
        stack.enter_context(watch)
        inp = _input(x, need_x and not sharded)
        out = call_block(spec, index, inp, args, kwargs).detach()
    after = _named(modules, "_buffers")
    # Norm layers' kernels write running statistics without bumping the version counter; the
    # other buffers show a change in their counter or identity (no device sync to compare values).
    mutated = frozenset(
        name
        for name, b in buffers.items()
        if after.get(name) is not b or b._version != versions[name] or name in statistics
    )
    drew = not same_state(state, rng.get_state())
    record = _Record(
        params=tuple(params),
        trainable=tuple(name for name, p in params.items() if p.requires_grad),
        buffers=tuple(buffers),
        mutated=mutated,
        n_rng=len(state) if drew else 0,
        need_x=need_x,
        sharded=sharded,
        modules=modules,
        training=training,
        generators=tuple(g for g, _ in watch.seen.values()),
    )
    tensors = (
        *params.values(),
        *(before[name] if name in mutated else b for name, b in buffers.items()),
        *(state if drew else ()),
        *(s for _, s in watch.seen.values()),
    )
    return out, record, tensors


# -- the nodes -----------------------------------------------------------------------------------


class _Run:
    """One memory-free forward: what its nodes share.

    During the forward it carries the records from ``_Start`` to the ``_Block`` nodes that save
    them; during the backward, the state each node hands to the one below.
    """

    def __init__(
        self,
        spec: StackSpec,
        treespec: pytree.TreeSpec,
        leaves: tuple[Any, ...],
        arg_tensors: Sequence[Tensor],
        device: torch.device,
        velocity: bool = True,
    ) -> None:
        self.spec = spec
        self.velocity = velocity  # the caller reads v_N (else the last node returns a placeholder)
        self.treespec = treespec
        self.leaves = leaves  # the extra arguments' leaves, _TENSOR where a tensor goes
        self.n_args = len(arg_tensors)
        self.arg_needs = tuple(t.requires_grad for t in arg_tensors)
        self.rng = RngTracker(device)
        self.autocast = AutocastState.capture(device)
        self.records: dict[int, tuple[_Record, tuple[Tensor, ...]]] = {}
        self.final: State = ()
        self.sketch: Tensor | None = None
        self.state: State | None = None  # handed down in backward
        self.handed: tuple[weakref.ref[Tensor], ...] = ()  # the gradients handed down with it
        self.nan: Tensor | None = None  # set where the forward met a NaN or inf

    def unflatten(self, tensors: Sequence[Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The extra arguments, with ``tensors`` where the forward's tensors were."""
        it = iter(tensors)
        leaves = [next(it) if leaf is _TENSOR else leaf for leaf in self.leaves]
        args, kwargs = pytree.tree_unflatten(leaves, self.treespec)
        return tuple(args), dict(kwargs)

    def owns(self, grad: Tensor | None) -> bool:
        """Whether ``grad`` is a gradient that the node above allocated and handed down: autograd
        passes it on untouched (the tensors between two nodes have no other consumer), so the
        node below may write into it."""
        return grad is not None and any(ref() is grad for ref in self.handed)

    def hand(self, *grads: Tensor | None) -> None:
        """Record the gradients, allocated by the node that returns them, that `owns` accepts."""
        self.handed = tuple(weakref.ref(g) for g in grads if g is not None)

    def take(self, index: int) -> State:
        """The state that the node above handed down."""
        state, self.state = self.state, None
        if state is None:
            raise InertiaError(
                f"memory-free backward: {self.spec.describe(index)} was reached without the state "
                "from the block above it; the nodes of one forward must run in order."
            )
        return state


def _keeps_graph() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``), so that its saved
    tensors serve another; True where this torch cannot say (a private API, read defensively)."""
    keeps = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keeps is None else bool(keeps())


def _placeholder(like: Tensor) -> Tensor:
    """A tensor with ``like``'s shape, dtype and device and one element of storage."""
    return like.new_empty(()).expand(like.shape)


def _undo(run: _Run, rng: tuple[Tensor, ...]) -> None:
    """Put back what the forward's calls changed and recorded, before the forward runs again: the
    buffers they mutated (the earliest call's copy wins), the generators of their own, and the
    default generators (``rng``, their state before the first call). Side effects that no record
    holds (a counter in a Python attribute) stay."""
    records = list(run.records.items())
    run.records.clear()
    with torch.no_grad():
        for index, (record, tensors) in reversed(records):
            module = run.spec.module(index)
            _, buffers, _, own = record.unpack(tensors)
            for name in record.mutated:
                live = module.get_buffer(name)
                if live.shape == buffers[name].shape:
                    live.copy_(buffers[name])
                else:
                    owner, _, leaf = name.rpartition(".")
                    setattr(module.get_submodule(owner), leaf, buffers[name].clone())
            for generator, state in zip(record.generators, own, strict=True):
                generator.set_state(state)
    run.rng.set_state(rng)


class _Start(torch.autograd.Function):
    """``x -> (x_0, v_0)``: runs the whole forward loop; its backward is the init function's."""

    @staticmethod
    def forward(ctx: Any, run: _Run, anchor: Tensor, x: Tensor, *tensors: Tensor) -> Any:
        spec, arith = run.spec, run.spec.arith
        args, kwargs = run.unflatten(tensors[: run.n_args])
        below = False  # a gradient is wanted below the call

        def call(index: int, inp: Tensor) -> Tensor:
            nonlocal below
            out, record, tensors = _record_call(spec, index, inp, args, kwargs, run.rng, below)
            run.records[index] = record, tensors
            below = below or bool(record.trainable)
            return out

        start = run.rng.get_state()
        while True:
            below = x.requires_grad or any(run.arg_needs)
            v = call(_INIT, arith.on_grid(x)) if spec.init_function is not None else None
            state = arith.encode(x, v)
            run.sketch = arith.fingerprint(state) if spec.check_inversion is not None else None
            for n in range(len(spec.blocks)):
                state = arith.step(state, call(n, arith.position(state)), n)
            try:
                finite = arith.check_range()
            except WordOverflow:  # the values left exact mode's int32 word: again, in int64
                _undo(run, start)
                continue
            break
        if not finite:  # a NaN or inf: NaN out, and NaN gradients (see `_nan`)
            state = arith.poisoned(state)
            run.nan = arith.position(state).new_full((), math.nan).expand(x.shape)
        run.final = state
        ctx.run = run
        ctx.record, init_tensors = run.records.pop(_INIT, (None, ()))
        ctx.save_for_backward(*init_tensors)
        ctx.set_materialize_grads(False)
        return _placeholder(arith.position(state)), _placeholder(arith.position(state))

    @staticmethod
    def backward(ctx: Any, grad_x: Tensor | None, grad_v: Tensor | None) -> tuple[Any, ...]:
        run: _Run = ctx.run
        record: _Record | None = ctx.record
        n_args = run.n_args
        n_init = len(ctx.needs_input_grad) - 3 - n_args
        init_grads: list[Tensor | None] = [None] * n_init
        if run.nan is not None:
            nans = _nan(record, ctx.saved_tensors, (), ()) if record is not None else []
            init_grads = nans[:n_init]
            grad_x = run.nan.contiguous()
        elif record is None:
            run.state = None
        else:
            x = run.spec.arith.position(run.take(_INIT))
            evaluation = _evaluate(run, _INIT, record, ctx.saved_tensors, x, ())
            dx, grads = evaluation.pull(grad_v)  # the init function's output is v_0
            init_grads = grads[:n_init]
            if dx is not None:
                grad_x = dx if grad_x is None else grad_x + dx
        grad_x = grad_x if ctx.needs_input_grad[2] else None
        return (None, None, grad_x, *([None] * n_args), *init_grads)


class _Block(torch.autograd.Function):
    """``(x_n, v_n) -> (x_{n+1}, v_{n+1})`` for block ``n``; saves what the block used."""

    @staticmethod
    def forward(ctx: Any, run: _Run, n: int, x: Tensor, v: Tensor, *tensors: Tensor) -> Any:
        record, own = run.records.pop(n)
        arg_tensors = tensors[len(record.trainable) :]
        sketch = (run.sketch,) if n == 0 and run.sketch is not None else ()
        ctx.save_for_backward(*own, *arg_tensors, *sketch)
        ctx.run, ctx.n, ctx.record = run, n, record
        ctx.has_sketch = bool(sketch)
        ctx.set_materialize_grads(False)
        if n == 0:
            run.sketch = None
        return _placeholder(x), _placeholder(v)

    @staticmethod
    def backward(ctx: Any, grad_x: Tensor | None, grad_v: Tensor | None) -> tuple[Any, ...]:
        if torch.is_grad_enabled():
            raise InertiaError(
                "double backward (create_graph=True) is not supported by the memory-free "
                "MomentumNet; construct it with use_backprop=True for higher-order gradients."
            )
        run: _Run = ctx.run
        n: int = ctx.n
        record: _Record = ctx.record
        spec, arith = run.spec, run.spec.arith
        saved = ctx.saved_tensors
        n_rec, n_args = record.n_tensors, run.n_args
        own, arg_tensors = saved[:n_rec], saved[n_rec : n_rec + n_args]
        if run.nan is not None:  # the forward met a NaN or inf: nothing to rebuild
            grads = _nan(record, own, arg_tensors, run.arg_needs)
            if not record.need_x:
                return (None, None, None, None, *grads)
            return (None, None, run.nan, run.nan, *grads)
        # The state from the node above (`_Finish`, from the saved final state), whose gradients
        # this node may overwrite where that node allocated them (`_Finish` passes the caller's).
        state = run.take(n)
        owned_x, owned_v = (run.owns(g) for g in (grad_x, grad_v))
        state = arith.unstep_position(state, n)
        evaluation = _evaluate(run, n, record, own, arith.position(state), arg_tensors)
        # v_n now: neither f nor the block's output then lives through the pullback.
        state = arith.unstep_velocity(state, evaluation.f(), n)
        evaluation.release()
        # a = dL/dx_{n+1} + dL/dv_{n+1}. The block's output enters v_{n+1} times 1 - gamma, which
        # autograd applies after casting the gradient to the output's dtype: so does this, in
        # place where it may (a then holds (1 - gamma) a, and no second tensor of the state's
        # size lives through the block's pullback).
        a, owned = _adjoint(grad_x, grad_v, owned_v)
        grad_f, scaled = None, False
        if a is not None:
            # In place, dL/dv_n = gamma a comes from (1 - gamma) a with two roundings more than
            # autograd's: a few units in the last place, not to be spent in 16-bit floats.
            if owned and a.dtype == evaluation.dtype and a.dtype.itemsize >= 4:
                grad_f, scaled = a.mul_(1 - arith.gamma), True
            else:
                grad_f = a.to(evaluation.dtype).mul(1 - arith.gamma)
        dx, grads = evaluation.pull(grad_f)
        subtract = evaluation.subtract and record.need_x
        del evaluation
        run.state = state
        if ctx.has_sketch:
            assert spec.check_inversion is not None
            check = Check(spec.check_inversion, spec.inversion_tol, len(spec.blocks))
            arith.verify(saved[-1], state, check)
        if not record.need_x:  # nothing below this block wants a gradient
            run.hand()
            return (None, None, None, None, *grads)
        # dL/dx_n = dL/dx_{n+1} + J_f^T grad_f. What autograd returned (dx, grads) may alias
        # grad_f or each other (a block adding a parameter hands both the same gradient): it is
        # read, never written.
        grad_x_in, own_x = _input_gradient(grad_x, owned_x, dx, grad_f if subtract else None)
        # dL/dv_n = gamma a.
        grad_v_in = None
        if a is not None:
            ratio = arith.gamma / (1 - arith.gamma) if scaled else arith.gamma
            in_place = owned and not _aliased(a, dx, *grads)
            grad_v_in = a.mul_(ratio) if in_place else a * ratio
        run.hand(grad_x_in if own_x else None, grad_v_in)
        return (None, None, grad_x_in, grad_v_in, *grads)


class _Finish(torch.autograd.Function):
    """``(x_N, v_N)``: the stack's output, after the last block. It saves the final state
    (`Arithmetic.finish`, `Arithmetic.saved`: float mode's ``x_N``, which is the output, and
    ``v_N``; exact mode's integers, with ``x_N`` as the output and a one-byte correction where it
    can), whose backward hands it to the last block's node and passes the caller's gradients on:
    autograd then frees the saved tensors before the last block's backward runs, which rewrites
    the state in place or drops it as it goes."""

    @staticmethod
    def forward(ctx: Any, run: _Run, x: Tensor, v: Tensor) -> Any:
        arith = run.spec.arith
        run.final = arith.finish(run.final)
        ctx.save_for_backward(*arith.saved(run.final))
        ctx.run = run
        ctx.set_materialize_grads(False)
        x_n = arith.position(run.final)
        return x_n, arith.velocity(run.final) if run.velocity else _placeholder(x_n)

    @staticmethod
    def backward(ctx: Any, grad_x: Tensor | None, grad_v: Tensor | None) -> tuple[Any, ...]:
        run: _Run = ctx.run
        try:
            saved = ctx.saved_tensors
        except RuntimeError as error:
            if "modified by an inplace operation" not in str(error):
                raise
            raise InertiaError(
                "memory-free backward: the output of this MomentumNet, from which its backward "
                "rebuilds the stack's activations, was modified in place after the forward (for "
                "example under torch.no_grad()). Modify a clone of it (out.clone()) instead."
            ) from error
        if run.nan is None:  # else nothing to rebuild: every node returns NaN
            run.state = run.spec.arith.restore(saved, not _keeps_graph())
        run.hand()  # the caller's gradients: not the stack's to write into
        return None, grad_x, grad_v


def _nan(
    record: _Record, saved: Sequence[Tensor], arg_tensors: Sequence[Tensor], needs: Sequence[bool]
) -> list[Tensor | None]:
    """NaN gradients for a call's trainable parameters and then its extra argument tensors,
    after a forward that met a NaN or inf: plain autograd would give NaN (at least where the NaN
    reached), and ``GradScaler`` skips a step whose gradients are not finite."""
    params = record.unpack(saved)[0]
    grads: list[Tensor | None] = [torch.full_like(params[n], math.nan) for n in record.trainable]
    for t, need in zip(arg_tensors, needs, strict=True):
        grads.append(torch.full_like(t, math.nan) if need else None)
    return grads


def _adjoint(
    grad_x: Tensor | None, grad_v: Tensor | None, owned_v: bool
) -> tuple[Tensor | None, bool]:
    """``dL/dx_{n+1} + dL/dv_{n+1}`` (either may be None) and whether the node may overwrite it:
    written into ``grad_v`` where the node owns it, else a new tensor, except where only one
    gradient is given (which is then the adjoint itself; ``grad_x`` is read again later)."""
    if grad_x is None or grad_v is None:
        return (grad_x, False) if grad_v is None else (grad_v, owned_v)
    if owned_v and grad_v is not grad_x:
        return grad_v.add_(grad_x), True
    return grad_x + grad_v, True


def _input_gradient(
    grad_x: Tensor | None, owned_x: bool, dx: Tensor | None, minus: Tensor | None
) -> tuple[Tensor | None, bool]:
    """``grad_x + dx - minus`` (None terms left out) and whether the node owns the result: written
    into ``grad_x`` where the node owns it, else into a new tensor, except where one term is all
    there is (``dx`` comes from autograd, which may hand the same tensor elsewhere)."""
    if owned_x:
        assert grad_x is not None
        if dx is not None:
            grad_x.add_(dx)
        return (grad_x if minus is None else grad_x.sub_(minus)), True
    terms = [t for t in (grad_x, dx) if t is not None]
    if not terms:
        return (None, False) if minus is None else (-minus, True)
    if len(terms) == 1:
        return (terms[0], False) if minus is None else (terms[0] - minus, True)
    total = terms[0] + terms[1]
    return (total if minus is None else total.sub_(minus)), True


def _aliased(t: Tensor, *others: Tensor | None) -> bool:
    """Whether one of ``others`` shares ``t``'s storage."""
    ptr = t.untyped_storage().data_ptr()
    return any(o is not None and o.untyped_storage().data_ptr() == ptr for o in others)


class _Evaluation:
    """One call evaluated again in the backward, with autograd recording."""

    def __init__(
        self,
        out: Tensor,
        inp: Tensor,
        subtract: bool,
        record: _Record,
        trainable: list[Tensor],
        arg_in: list[Tensor],
        after: contextlib.ExitStack | None = None,
    ) -> None:
        self.out: Tensor | None = out  # f, or x + f for a block that is not ``is_residual``
        self.inp = inp  # the leaf aliasing the call's input
        self.subtract = subtract  # whether f is ``out - inp`` (kept outside autograd's graph)
        self.record = record
        self.trainable = trainable  # leaves aliasing the forward's trainable parameters
        self.arg_in = arg_in  # leaves aliasing the extra argument tensors
        # Closed by `pull`: a live module's norm statistics, put back once its backward has run
        # (the norm layers save them, so they cannot be put back in between).
        self.after = after or contextlib.ExitStack()
        self.out_dtype = out.dtype
        self.differentiable = out.requires_grad
        # Where the pullback starts: the output, or its gradient edge once `release`d.
        self.root: Tensor | torch.autograd.graph.GradientEdge = out

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of f."""
        if self.subtract:
            return torch.promote_types(self.out_dtype, self.inp.dtype)
        return self.out_dtype

    def f(self) -> Tensor:
        """f, detached: the value that the forward added to the velocity."""
        assert self.out is not None, "f is read before `release`"
        out = self.out.detach()
        return out - self.inp.detach() if self.subtract else out

    def release(self) -> None:
        """Let go of the output, keeping its place in the graph: the pullback then starts from its
        gradient edge, and its memory is freed through the pullback (unless the graph saved it)."""
        if self.differentiable and not self.record.sharded:
            self.root = torch.autograd.graph.get_gradient_edge(self.root)  # type: ignore[arg-type]
            self.out = None

    def pull(self, grad_f: Tensor | None) -> tuple[Tensor | None, list[Tensor | None]]:
        """Pull back the gradient of f through ``out``: returns ``J_out^T grad_f`` for the input
        (None where the forward's input did not require grad) and the gradients of the trainable
        parameters and then of the extra argument tensors, in the order the node received them.

        Where ``f = out - x``, the caller subtracts ``grad_f`` from the input's gradient: the
        subtraction is not in the graph, so that no second gradient of the input's size lives
        through the block's pullback.
        """
        with self.after:
            return self._pull(grad_f)

    def _pull(self, grad_f: Tensor | None) -> tuple[Tensor | None, list[Tensor | None]]:
        record = self.record
        none: list[Tensor | None] = [None] * (len(record.trainable) + len(self.arg_in))
        dx, grads = None, none
        if grad_f is not None and self.differentiable:
            grad_out = grad_f.to(self.out_dtype)  # as autograd casts the gradient of out - x
            if record.sharded:  # FSDP2 reduce-scatters the parameters' gradients itself
                assert isinstance(self.root, Tensor)
                torch.autograd.backward(self.root, grad_out)
                dx = self.inp.grad if record.need_x else None
                arg_grads = [t.grad if t.requires_grad else None for t in self.arg_in]
                grads = [*none[: len(record.trainable)], *arg_grads]
            else:
                wanted = [t for t in self.arg_in if t.requires_grad]
                inputs = ([self.inp] if record.need_x else []) + self.trainable + wanted
                if inputs:
                    grad = torch.autograd.grad(self.root, inputs, grad_out, allow_unused=True)
                    pulled = list(grad)
                    dx = pulled.pop(0) if record.need_x else None
                    it = iter(pulled[len(self.trainable) :])
                    arg_grads = [next(it) if t.requires_grad else None for t in self.arg_in]
                    grads = [*pulled[: len(self.trainable)], *arg_grads]
        return dx, grads


def _evaluate(
    run: _Run,
    index: int,
    record: _Record,
    saved: Sequence[Tensor],
    x: Tensor,
    arg_tensors: Sequence[Tensor],
) -> _Evaluation:
    """Evaluate call ``index`` at ``x`` once more, as its forward did, with autograd recording.

    ``saved`` are the call's record tensors and ``arg_tensors`` the extra arguments' (none for
    the init function, which takes ``x`` only).
    """
    spec = run.spec
    module = spec.module(index)
    params, buffers, rng_state, own = record.unpack(saved)
    arg_in: list[Tensor] = []
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    if index != _INIT:
        needs = zip(arg_tensors, run.arg_needs, strict=True)
        arg_in = [t.detach().requires_grad_(need) for t, need in needs]
        args, kwargs = run.unflatten(arg_in)
    subtract = index != _INIT and not spec.is_residual
    replay = contextlib.ExitStack()
    replay.enter_context(_training(record))
    if record.generators:
        replay.enter_context(replaying(record.generators, own))
    if rng_state:
        replay.enter_context(run.rng.fork())
    with replay:
        if rng_state:
            run.rng.set_state(rng_state)
        if record.sharded:
            # FSDP2 registers the unsharded parameters for the duration of the block's call only,
            # and reduce-scatters their gradients once autograd has accumulated them (its hooks
            # on the call's inputs and outputs): the live module runs, its norm statistics kept.
            with contextlib.ExitStack() as after:
                after.enter_context(frozen_running_stats(module))
                with torch.enable_grad(), run.autocast.enter():
                    inp = _input(x, record.need_x)
                    out = call_block(spec, index, inp, args, kwargs, subtract=False)
                return _Evaluation(out, inp, subtract, record, [], arg_in, after.pop_all())
        # Leaves aliasing the tensors the forward used (the gradients are taken with respect to
        # them); each mutated buffer starts from its value before the forward's call, in a copy
        # that the recomputation may mutate in turn, so that the module keeps the forward's result.
        bound: dict[str, Tensor] = {
            name: p.detach().requires_grad_(name in record.trainable) for name, p in params.items()
        }
        for name, b in buffers.items():
            bound[name] = b.clone() if name in record.mutated else b
        with torch.enable_grad(), run.autocast.enter(), _bound(record, bound, saved):
            inp = _input(x, record.need_x)
            out = call_block(spec, index, inp, args, kwargs, subtract=False)
    trainable = [bound[name] for name in record.trainable]
    return _Evaluation(out, inp, subtract, record, trainable, arg_in)


@contextlib.contextmanager
def _bound(record: _Record, bound: dict[str, Tensor], saved: Sequence[Tensor]) -> Iterator[None]:
    """The module's parameters and buffers replaced by ``bound``'s tensors (by name, and, for a
    tensor that the module holds under a second name, by identity with the forward's), then put
    back: ``torch.func.functional_call``'s binding, without its general machinery, whose cost
    counted for small blocks."""
    names = (*record.params, *record.buffers)
    by_id = {id(t): name for name, t in zip(names, saved, strict=False)}
    swapped: list[tuple[dict[str, Any], str, Any]] = []
    try:
        for prefix, m in record.modules:
            tables: tuple[dict[str, Any], ...] = (m._parameters, m._buffers)
            for table in tables:
                for attr, t in table.items():  # assigning to a key it has: no resize
                    if t is None:
                        continue
                    name = f"{prefix}.{attr}" if prefix else attr
                    key = name if name in bound else by_id.get(id(t))
                    if key is not None:
                        swapped.append((table, attr, t))
                        table[attr] = bound[key]
        yield
    finally:
        for table, attr, t in reversed(swapped):
            table[attr] = t


@contextlib.contextmanager
def _training(record: _Record) -> Iterator[None]:
    """The call's module and its submodules in the forward's train/eval modes, then as they are
    now (nothing to do where they did not change)."""
    modules = [m for _, m in record.modules]
    now = [m.training for m in modules]
    if now == list(record.training):
        yield
        return
    try:
        for m, flag in zip(modules, record.training, strict=True):
            m.training = flag
        yield
    finally:
        for m, flag in zip(modules, now, strict=True):
            m.training = flag


def _is_cache(value: Any) -> bool:
    """Duck-typed key/value cache (HuggingFace's Cache classes)."""
    return hasattr(value, "update") and hasattr(value, "get_seq_length")


def records_autograd(
    spec: StackSpec, x: Tensor, args: Sequence[Any], kwargs: dict[str, Any]
) -> bool:
    """Whether autograd records the stack at this call: grad mode is on, and the input, a tensor
    among the extra arguments or a parameter of the stack requires grad."""
    if not torch.is_grad_enabled():
        return False
    leaves = pytree.tree_leaves((tuple(args), dict(kwargs)))
    modules = [m for m in (spec.init_function, *spec.blocks) if m is not None]
    return (
        x.requires_grad
        or any(isinstance(t, Tensor) and t.requires_grad for t in leaves)
        or any(p.requires_grad for m in modules for p in m.parameters())
    )


def momentum_forward(
    spec: StackSpec,
    x: Tensor,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    *,
    memory_free: bool,
    checkpointed: bool = False,
    integers: bool = False,
    velocity: bool = True,
) -> State:
    """Run the stack: memory-free, or each block under ``torch.utils.checkpoint``
    (``checkpointed``), when asked (the caller asks where autograd records the stack, see
    `records_autograd`), with autograd or without it otherwise. ``integers``: the caller keeps
    the final state's integers (``return_state=True``); else the backward may write into them.
    ``velocity``: the caller reads ``v_N``; else the memory-free stack returns a placeholder of its
    shape, which exact mode does not convert from its integers."""
    if not ((memory_free or checkpointed) and spec.blocks):
        return run_forward(spec, x, args, kwargs)
    mode = "memory-free" if memory_free else "checkpointed"
    hf = [
        n
        for n, block in enumerate(spec.blocks)
        if any(getattr(m, "gradient_checkpointing", False) is True for m in block.modules())
    ]
    if hf and any(block.training for block in spec.blocks):
        why = (
            "the memory-free stack keeps no activations"
            if memory_free
            else "the stack checkpoints each block already"
        )
        raise InertiaError(
            f"HuggingFace's activation checkpointing is on in blocks {hf[0]} to {hf[-1]} "
            f"({len(hf)} of {len(spec.blocks)}) of a {mode} MomentumNet: their backward would "
            "run each of them twice more (the checkpoint's recomputation inside the stack's "
            f"own), for no memory saved, since {why}. Turn it off: "
            "model.activation_checkpointing_disable() (gradient_checkpointing_disable() before "
            "transformers 5; in a Trainer, TrainingArguments(gradient_checkpointing=False))."
        )
    if any(_is_cache(v) for v in (*args, *kwargs.values())):
        warnings.warn(
            f"a key/value cache was passed to a {mode} MomentumNet (use_cache=True, "
            "HuggingFace's default): the backward runs every block again and would update it "
            "twice, so this forward runs without it, as HuggingFace's gradient checkpointing does "
            "in training. Pass use_cache=False to silence this (generation, which runs no "
            "backward, keeps its cache).",
            UserWarning,
            stacklevel=3,
        )
        args = tuple(None if _is_cache(a) else a for a in args)
        kwargs = {k: None if _is_cache(v) else v for k, v in kwargs.items()}
    if checkpointed:
        return run_forward(spec, x, args, kwargs, checkpointed=True)
    leaves, treespec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    arg_tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
    run = _Run(
        spec,
        treespec,
        tuple(_TENSOR if isinstance(leaf, Tensor) else leaf for leaf in leaves),
        arg_tensors,
        x.device,
        velocity or integers,
    )
    return _apply(run, x, arg_tensors, integers)


# The memory-free nodes keep generator states and an inversion sketch, which dynamo cannot trace,
# and its blocks must run alike in the forward and the recomputation: `torch.compile` on a whole
# model stops here (one graph break) and compiles the layers around the stack; blocks compiled
# themselves (`block.compile()`) still run compiled inside it.
@eager
def _apply(run: _Run, x: Tensor, arg_tensors: list[Tensor], integers: bool) -> State:
    spec = run.spec
    # An anchor that requires grad keeps every node in the graph, so that the backward reaches
    # block 0 (and checks the reconstruction there) even below frozen blocks.
    anchor = torch.empty(0, device=x.device, requires_grad=True)
    init_params: list[Tensor] = []
    if spec.init_function is not None:
        init_params = [p for p in spec.init_function.parameters() if p.requires_grad]
    tx, tv = _Start.apply(run, anchor, x, *arg_tensors, *init_params)
    final = run.final
    for n in range(len(spec.blocks)):
        record, tensors = run.records[n]
        params = dict(zip(record.params, tensors, strict=False))
        trainable = [params[name] for name in record.trainable]
        tx, tv = _Block.apply(run, n, tx, tv, *trainable, *arg_tensors)
    tx, tv = _Finish.apply(run, tx, tv)
    run.final = ()
    # `_Finish` saved these integers, and the backward writes into them unless it must keep
    # them: the caller gets copies.
    ints = tuple(t.clone() for t in final[2:]) if integers else final[2:]
    return (tx, tv, *ints)
