"""`MomentumNet`: residual blocks with momentum, trainable without storing activations."""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, overload

import torch
from torch import Tensor, nn

from ._core import (
    Arithmetic,
    ExactArithmetic,
    ExactState,
    FloatArithmetic,
    StackSpec,
    State,
    Word,
    checkpointed_call,
    communicates,
    inverse,
    momentum_forward,
    records_autograd,
)
from ._errors import InertiaError

__all__ = ["MomentumNet", "from_momentumnet_state_dict"]

_CHECK_INVERSION = ("warn", "raise", None)
METHODS = ("memory_free", "checkpoint")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class MomentumNet(nn.Module):
    r"""A Momentum Residual Network (Sander, Ablin, Blondel and Peyré, ICML 2021).

    Iterates, over the blocks ``f_0 ... f_{N-1}``,

    ```text
    v_{n+1} = gamma * v_n + (1 - gamma) * f_n(x_n)
    x_{n+1} = x_n + v_{n+1}
    ```

    from ``v_0 = init_function(x_0)`` (or zero). The map inverts in closed form, so with
    ``use_backprop=False`` training keeps no activations: backward rebuilds ``x_n, v_n`` block by
    block, evaluating each block once for both the inverse and the vector-Jacobian product. Memory
    for backward is then constant in depth. ``gamma = 0`` is the plain ResNet.

    The signature and defaults are those of the paper's package (``momentumnet`` 0.10), so
    ``from inertia import MomentumNet`` replaces ``from momentumnet import MomentumNet``.

    Args:
        functions: The blocks, as a list, ``nn.ModuleList`` or ``nn.Sequential``. Each maps ``x`` of
            any shape ``(*)`` (and the extra arguments of ``forward``) to a tensor of shape
            ``(*)``.
            They become children ``"0" ... "N-1"``; the same module may appear more than once.
        gamma: The momentum, ``0 <= gamma <= 1``. Memory-free mode needs ``gamma > 0``.
        init_speed: Start from ``v_0 = init_function(x_0)`` instead of zero.
        init_function: Module mapping ``x_0`` to ``v_0`` (same shape); child ``"init"``.
        use_backprop: True: ordinary autograd through the loop. False: save memory, the way
            ``method`` says.
        is_residual: True: blocks are residuals ``f``. False: each block is a whole map ``g``, and
            ``f(x) = g(x) - x``.
        check_inversion: Memory-free mode only. ``"warn"`` or ``"raise"`` when the backward's
            reconstruction of ``(x_0, v_0)`` drifts from the forward's by more than
            ``inversion_tol`` (relative), measured on a random-projection sketch; None: no check.
        inversion_tol: Relative drift allowed; default ``sqrt(eps)`` of the input's dtype
            (float32: 3.5e-4, float64: 1.5e-8).
        keep_first: How many leading blocks run as ordinary layers, ``x = f(x)``, before the
            momentum stack starts; they may change the shape (the first block of a ResNet stage).
            They keep their activations for backward unless ``checkpoint_kept``.
        checkpoint_kept: Run the ``keep_first`` blocks under ``torch.utils.checkpoint`` while
            training, so that they store only their input.
        method: How ``use_backprop=False`` saves memory: ``"memory_free"`` (the default) keeps
            only the final state and rebuilds the activations in backward;
            ``"checkpoint"`` runs each block under ``torch.utils.checkpoint`` (float
            arithmetic, unless ``exact=True``), keeping each block's input: about as few bytes
            as memory-free for stacks of one or two blocks (see `inertia.Plan`), and no
            inversion.
            Both replay each block's random numbers (its own generators too) and update norm
            statistics once. `transform_to_momentumnet` chooses it per stack.
        exact: Hold ``x`` and ``v`` in fixed point (integer words on a grid: ``fraction_bits``)
            with a buffer for the bits that multiplying by gamma destroys, so that the memory-free
            backward rebuilds every activation bit for bit, at any depth and gamma (float
            reconstruction drifts like ``eps * gamma**-depth``). None (default): exact exactly
            when the backward is memory-free (``use_backprop=False`` and ``gamma > 0``), decided
            at each forward, so that switching ``use_backprop`` later switches the arithmetic
            with it. True or False pins it: ``use_backprop=False, exact=False`` is the float
            memory-free mode, and ``use_backprop=True, exact=True`` is the exact memory-free
            mode's backprop twin (`inertia.testing.backprop_twin`).
            Blocks see the float value of the fixed-point ``x``; rounding passes gradients
            straight through. The buffer costs about ``log2(1 / gamma)`` bits per element per
            block. gamma is taken as the closest fraction with denominator at most ``2**24``
            (within 6e-8; equal for any gamma with six decimals). A forward that autograd does
            not record (under ``torch.no_grad()`` or ``inference_mode``, nothing requiring grad)
            runs the float update instead, with that gamma: the integers serve the memory-free
            backward only, and ``return_state=True`` still returns them. Needs float64 on the
            device (not Apple MPS: pass ``exact=False`` there).
        fraction_bits: Exact mode's grid. None (default): relative to the data's scale, row by
            row. Each row of the stack input (its first two dims where it has three or more: a
            sample's channel, or token; its first for a matrix) gets at each forward the step
            ``2**-(24 - e)`` (float64 inputs: ``2**-(40 - e)``), where ``2**(e - 1) <= m < 2**e``
            and ``m`` is the row's largest magnitude, or 1/16 of its sample's where that is
            larger: float32's own precision at ``m`` (eight bits finer than bf16's), so that
            samples of 1e-9 are as accurate as samples of 1, whatever else the batch holds, and a
            loud channel or token does not coarsen the grid of rows up to 16 times quieter in its
            sample. Words are int32 while the values stay below
            ``2**(7 + e)`` (at least 128 times ``m``); a forward that leaves that range runs
            again on a grid that moves with the data (each row that grows moves to a coarser
            grid, the bits it drops kept in an int32 buffer), or, where that cannot hold them,
            in int64 (values below ``2**(37 + e)``; float64 inputs always use int64, below
            ``2**(21 + e)``), and the stack's `Word` (``net.word``) counts it and stays there.
            An integer: a fixed grid of step
            ``2**-fraction_bits`` for every element, int64 words, values below
            ``2**(61 - fraction_bits)``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from inertia import MomentumNet
        >>> def block():
        ...     return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
        >>> blocks = [block() for _ in range(10)]
        >>> net = MomentumNet(blocks, gamma=0.9, use_backprop=False)
        >>> net(torch.randn(4, 8)).shape
        torch.Size([4, 8])
    """

    def __init__(
        self,
        functions: Iterable[nn.Module],
        gamma: float,
        init_speed: bool = False,
        init_function: nn.Module | None = None,
        use_backprop: bool = True,
        is_residual: bool = True,
        *,
        check_inversion: str | None = "warn",
        inversion_tol: float | None = None,
        keep_first: int = 0,
        checkpoint_kept: bool = False,
        exact: bool | None = None,
        fraction_bits: int | None = None,
        method: str = "memory_free",
    ) -> None:
        super().__init__()
        blocks = list(functions)
        if isinstance(keep_first, bool) or not 0 <= keep_first <= len(blocks):
            raise ValueError(
                f"keep_first={keep_first!r}; it counts leading blocks, from 0 to len(functions) "
                f"= {len(blocks)}."
            )
        self.keep_first = keep_first
        self.checkpoint_kept = checkpoint_kept
        for i, block in enumerate(blocks):
            if not isinstance(block, nn.Module):
                raise TypeError(
                    f"functions[{i}] is a {type(block).__name__}; MomentumNet needs nn.Module "
                    "blocks (wrap a function in a small nn.Module)."
                )
            self.add_module(str(i), block)
        self._depth = len(blocks)
        if init_speed and init_function is None:
            raise ValueError("init_speed=True needs an init_function that maps x_0 to v_0.")
        if init_function is not None:
            if not init_speed:
                warnings.warn(
                    "init_function is given but init_speed=False, so it is not used and v_0 = 0; "
                    "pass init_speed=True to use it.",
                    UserWarning,
                    stacklevel=2,
                )
            self.add_module("init", init_function)
        self.init_speed = init_speed
        self.is_residual = is_residual
        self.check_inversion = check_inversion
        self.inversion_tol = inversion_tol
        if fraction_bits is not None and (
            isinstance(fraction_bits, bool) or not isinstance(fraction_bits, int)
        ):
            raise TypeError(
                f"fraction_bits must be an int or None; got {type(fraction_bits).__name__}."
            )
        if fraction_bits is not None and not 1 <= fraction_bits <= 60:
            raise ValueError(
                f"fraction_bits={fraction_bits}; use 1 to 60 (the grid step is 2**-fraction_bits "
                "and values must stay below 2**(61 - fraction_bits))."
            )
        self.fraction_bits = fraction_bits
        # Exact mode's integer word for x and v (int32 until a memory-free forward overflows it).
        self.word = Word()
        self.exact = exact
        self._method = _validate_method(method)
        self._gamma = _validate_gamma(gamma, not use_backprop and method == "memory_free")
        self._use_backprop = bool(use_backprop)

    @property
    def gamma(self) -> float:
        """The momentum term; validated when set."""
        return self._gamma

    @gamma.setter
    def gamma(self, value: float) -> None:
        self._gamma = _validate_gamma(value, self._inverts())
        self._note(gamma=self._gamma)

    @property
    def use_backprop(self) -> bool:
        """False for the memory-free backward; may be switched at any time."""
        return self._use_backprop

    @use_backprop.setter
    def use_backprop(self, value: bool) -> None:
        _validate_gamma(self._gamma, not value and self._method == "memory_free")
        self._use_backprop = bool(value)
        self._note(use_backprop=self._use_backprop)

    @property
    def method(self) -> str:
        """How ``use_backprop=False`` saves memory: ``"memory_free"`` or ``"checkpoint"`` (see
        the class's docstring); validated when set."""
        return self._method

    @method.setter
    def method(self, value: str) -> None:
        _validate_gamma(self._gamma, not self._use_backprop and value == "memory_free")
        self._method = _validate_method(value)
        self._note(method=value)

    def _inverts(self) -> bool:
        """Whether the backward inverts the update (memory-free), where autograd records."""
        return not self._use_backprop and self._method == "memory_free"

    @property
    def exact(self) -> bool:
        """True where the stack runs fixed-point arithmetic with a bit-exact inverse: the value
        set, or where it was left None, whether the backward is memory-free (``use_backprop``
        False, ``method="memory_free"`` and ``gamma > 0``). Set True, False or None (the default)
        at any time."""
        if self._exact is None:
            return self._inverts() and self._gamma > 0
        return self._exact

    @exact.setter
    def exact(self, value: bool | None) -> None:
        if value is not None and not isinstance(value, bool):
            raise TypeError(
                f"exact must be True, False or None (exact when memory-free); got "
                f"{type(value).__name__}."
            )
        self._exact = value
        self._note(exact=value)

    @property
    def check_inversion(self) -> str | None:
        """``"warn"``, ``"raise"`` or None; validated when set."""
        return self._check_inversion

    @check_inversion.setter
    def check_inversion(self, value: str | None) -> None:
        if value not in _CHECK_INVERSION:
            raise ValueError(f"check_inversion={value!r}; use 'warn', 'raise' or None (no check).")
        self._check_inversion = value
        self._note(check_inversion=value)

    @property
    def inversion_tol(self) -> float | None:
        """Relative drift allowed, or None for ``sqrt(eps)`` of the dtype; validated when set."""
        return self._inversion_tol

    @inversion_tol.setter
    def inversion_tol(self, value: float | None) -> None:
        if value is not None and not value > 0:
            raise ValueError(f"inversion_tol={value!r}; it must be a positive number or None.")
        self._inversion_tol = value
        self._note(inversion_tol=value)

    def _note(self, **changes: Any) -> None:
        """Keep the conversion record of a HuggingFace model's config (``config.inertia``, written
        by ``save_pretrained``) in step with a setting changed after the conversion."""
        if self._inertia_record is not None:
            self._inertia_record.update(changes)

    @property
    def functions(self) -> list[nn.Module]:
        """The blocks, in order (``momentumnet`` compatibility)."""
        return self._blocks()

    @property
    def init_function(self) -> nn.Module | None:
        """The module computing ``v_0``, or None."""
        return self._modules.get("init")

    def __len__(self) -> int:
        return self._depth

    def __iter__(self) -> Iterator[Any]:
        return iter(self._blocks())

    @overload
    def __getitem__(self, idx: int) -> nn.Module: ...

    @overload
    def __getitem__(self, idx: slice) -> MomentumNet: ...

    def __getitem__(self, idx: int | slice) -> nn.Module | MomentumNet:
        if isinstance(idx, slice):
            start, stop, step = idx.indices(self._depth)
            if step != 1:
                raise IndexError("MomentumNet slices must be contiguous (step 1).")
            if (start, stop) == (0, self._depth):
                return self  # parents that slice all their layers keep this module and its hooks
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # gamma = 1 was warned about already
                return type(self)(
                    self._blocks()[idx],
                    self._gamma,
                    init_speed=self.init_speed and start == 0,
                    init_function=self.init_function if start == 0 else None,
                    use_backprop=self._use_backprop,
                    is_residual=self.is_residual,
                    check_inversion=self.check_inversion,
                    inversion_tol=self.inversion_tol,
                    keep_first=max(0, min(stop, self.keep_first) - start),
                    checkpoint_kept=self.checkpoint_kept,
                    exact=self._exact,
                    fraction_bits=self.fraction_bits,
                    method=self._method,
                )
        if not -self._depth <= idx < self._depth:
            raise IndexError(
                f"index {idx} is out of range for a MomentumNet of {self._depth} blocks"
            )
        return self._block(idx % self._depth)

    def _block(self, i: int) -> nn.Module:
        return self._modules[str(i)]  # type: ignore[return-value]

    def _blocks(self) -> list[nn.Module]:
        return [self._block(i) for i in range(self._depth)]

    _unpack_tuples = False  # see MomentumLayerList
    # This stack's entry in a HuggingFace model's conversion record (`transform_to_momentumnet`).
    _inertia_record: dict[str, Any] | None = None

    def _fraction_bits(self, dtype: torch.dtype) -> int:
        if self.fraction_bits is not None:
            return self.fraction_bits
        return 40 if dtype == torch.float64 else 24

    def _spec(self, dtype: torch.dtype) -> StackSpec:
        blocks = tuple(self._blocks()[self.keep_first :])
        arith: Arithmetic = (
            ExactArithmetic(
                self._gamma,
                self._fraction_bits(dtype),
                len(blocks),
                relative=self.fraction_bits is None,
                word=self.word if dtype != torch.float64 else None,
            )
            if self.exact
            else FloatArithmetic(self._gamma)
        )
        return StackSpec(
            blocks=blocks,
            init_function=self.init_function if self.init_speed else None,
            arith=arith,
            is_residual=self.is_residual,
            check_inversion=self.check_inversion,
            inversion_tol=self.inversion_tol,
            first_index=self.keep_first,
            unpack_tuples=self._unpack_tuples,
        )

    def _run_kept(
        self, spec: StackSpec, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Tensor:
        for i in range(self.keep_first):
            block = self._block(i)
            if self.checkpoint_kept and torch.is_grad_enabled():
                x = checkpointed_call(block)(x, *args, **kwargs)
            else:
                x = block(x, *args, **kwargs)
            x = spec.unpack(x)
            if not isinstance(x, Tensor):
                raise InertiaError(
                    f"block {i} ({type(block).__name__}) returned {type(x).__name__}; blocks must "
                    "return one tensor."
                )
        return x

    def forward(
        self,
        x: Tensor,
        *args: Any,
        return_velocity: bool = False,
        return_state: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Run the stack.

        Args:
            x: Input of shape ``(*)``, floating point.
            *args: Passed to every block after ``x``. Tensors among them get gradients (summed
                over blocks), in both modes.
            return_velocity: Also return the final velocity ``v_N``.
            return_state: Exact mode only: return the `ExactState` (fixed-point ``x_N``, ``v_N``
                and buffer; its ``position`` is the usual output), which `inverse` takes.
            **kwargs: Passed to every block.

        Returns:
            ``x_N`` of shape ``(*)``, ``(x_N, v_N)`` with ``return_velocity=True``, or an
            `ExactState` with ``return_state=True``.
        """
        if return_state and not self.exact:
            raise ValueError(
                "return_state=True needs exact mode (exact=True, or use_backprop=False with exact "
                "left None); use return_velocity=True."
            )
        state, spec = self._run(x, args, kwargs, return_state, return_velocity)
        arith = spec.arith
        if return_state:
            assert isinstance(arith, ExactArithmetic)
            return arith.to_exact_state(state)
        x_n = arith.position(state)
        return (x_n, arith.velocity(state)) if return_velocity else x_n

    def _run(
        self,
        x: Tensor,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        integers: bool = False,
        velocity: bool = True,
    ) -> tuple[State, StackSpec]:
        """The stack's final state, and its spec. Exact mode runs the float update, with its
        rational gamma, where autograd does not record (no backward will invert it) unless
        ``integers`` asks for the fixed-point state. ``velocity``: the caller reads ``v_N``."""
        _check_input(x)
        spec = self._spec(x.dtype)
        x = self._run_kept(spec, x, args, kwargs)
        recording = records_autograd(spec, x, args, kwargs)
        if isinstance(spec.arith, ExactArithmetic) and not integers and not recording:
            spec = dataclasses.replace(spec, arith=FloatArithmetic(spec.arith.gamma))
        # Memory-free where a backward will come and can invert (gamma = 0 cannot).
        memory_free = recording and self._inverts() and self._gamma > 0
        checkpointed = recording and not self._use_backprop and self._method == "checkpoint"
        if isinstance(spec.arith, ExactArithmetic) and (
            not (memory_free and spec.blocks) or communicates(spec.blocks)
        ):
            # Nothing is kept (or autograd keeps its own graph), or the blocks' forwards cannot
            # run again on one rank alone: int64 words, on the same grid, never overflow and give
            # the memory-free forward's values, which need no rerun.
            spec.arith.widen(count=False)
        state = momentum_forward(
            spec,
            x,
            args,
            kwargs,
            memory_free=memory_free,
            checkpointed=checkpointed,
            integers=integers,
            velocity=velocity,
        )
        return state, spec

    def inverse(self, x: Tensor | ExactState, *args: Any, **kwargs: Any) -> Any:
        """Reconstruct ``(x_0, v_0)`` from ``(x_N, v_N)``, without autograd.

        Float mode: ``inverse(x_N, v_N, *args, **kwargs)`` returns ``(x_0, v_0)``, exact up to
        float rounding, which grows like ``eps * gamma**-depth``. Exact mode:
        ``inverse(state, *args, **kwargs)`` takes the `ExactState` from
        ``forward(x, return_state=True)`` and returns the `ExactState` of the stack's input, bit
        for bit as the forward saw it (its buffer empty again). With ``keep_first``, ``x_0`` is the
        input of the momentum stack (the output of the kept blocks), which are not inverted. Blocks
        must be deterministic (eval mode for dropout) and stateless for the inverse to match the
        forward.

        Examples:
            >>> net = MomentumNet([nn.Linear(3, 3) for _ in range(4)], gamma=0.9).eval()
            >>> x = torch.randn(2, 3)
            >>> x0, v0 = net.inverse(*net(x, return_velocity=True))
            >>> torch.allclose(x0, x, atol=1e-5)
            True
            >>> net.exact = True
            >>> start = net.inverse(net(x, return_state=True))
            >>> half = 2.0 ** -(start.fraction_bits + 1)  # half a grid step, row by row
            >>> bool(((start.position - x).abs() <= half).all()), start.words
            (True, ())
        """
        if self._gamma == 0:
            raise ValueError("gamma = 0 is not invertible (the inverse divides by gamma).")
        if isinstance(x, ExactState):
            spec = self._spec(x.position.dtype)
            if not isinstance(spec.arith, ExactArithmetic):
                raise TypeError("an ExactState comes from an exact MomentumNet; set exact=True.")
            state = inverse(spec, spec.arith.from_exact_state(x), args, kwargs)
            return spec.arith.to_exact_state(state)
        if self.exact:
            raise TypeError(
                "an exact MomentumNet inverts the ExactState from forward(x, return_state=True); "
                f"got {type(x).__name__}. For the float inverse of (x_N, v_N), set exact=False "
                "(exact mode is the default of use_backprop=False)."
            )
        if not args:
            raise TypeError("inverse(x_N, v_N, *args, **kwargs) needs the velocity v_N.")
        v, *rest = args
        _check_input(x)
        if x.shape != v.shape:
            raise ValueError(f"x has shape {tuple(x.shape)} but v has {tuple(v.shape)}.")
        spec = self._spec(x.dtype)
        state = inverse(spec, (x, v), rest, kwargs)
        return spec.arith.position(state), spec.arith.velocity(state)

    def extra_repr(self) -> str:
        return (
            f"gamma={self._gamma}, use_backprop={self._use_backprop}, "
            f"is_residual={self.is_residual}, init_speed={self.init_speed}"
            + (f", keep_first={self.keep_first}" if self.keep_first else "")
            + (f", method={self._method!r}" if self._method != "memory_free" else "")
            + (f", exact={self._exact}" if self._exact is not None else "")
            + (f", fraction_bits={self.fraction_bits}" if self.fraction_bits is not None else "")
        )


def _validate_method(method: Any) -> str:
    if method not in METHODS:
        raise ValueError(
            f"method={method!r}; use 'memory_free' (keep the final state, rebuild the "
            "activations in backward) or 'checkpoint' (keep each block's input)."
        )
    return str(method)


def _validate_gamma(gamma: Any, inverts: bool) -> float:
    """``gamma`` as a float; ``inverts``: the backward would invert the update (memory-free)."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"gamma must be a real number in [0, 1]; got {type(gamma).__name__}.")
    value = float(gamma)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(
            f"gamma={value!r} is outside [0, 1]; the momentum must satisfy 0 <= gamma <= 1."
        )
    if value == 0.0 and inverts:
        warnings.warn(
            "gamma=0 with use_backprop=False: the memory-free backward inverts the velocity update "
            "by dividing by gamma, so this stack trains with backprop instead (gamma=0 is the "
            "plain ResNet, which stores its activations). Use gamma > 0 (the paper uses 0.9) to "
            "train memory-free, method='checkpoint' to keep only each block's input, or "
            "use_backprop=True to silence this.",
            UserWarning,
            stacklevel=3,
        )
    if value == 1.0:
        warnings.warn(
            "gamma=1 makes every block inert (v_n = v_0 for all n, so the blocks never affect "
            "the output); use gamma < 1.",
            UserWarning,
            stacklevel=3,
        )
    return value


def _check_input(x: Any) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"MomentumNet expects a tensor input; got {type(x).__name__}.")
    if x.dtype not in _DTYPES:
        raise TypeError(
            f"MomentumNet needs a real floating-point input (float16, bfloat16, float32 or "
            f"float64); got {x.dtype}. Convert it first, for example x.float()."
        )


_MOMENTUMNET_KEY = re.compile(r"(^|\.)network\.(?=(\d+|init)\.)")


def from_momentumnet_state_dict(
    state_dict: Mapping[str, Any],
    sub_layers: Iterable[str] | None = None,
    keep_first_layer: bool = True,
) -> dict[str, Any]:
    """Rename the keys of a state_dict saved by ``momentumnet`` 0.10 to inertia's.

    ``momentumnet`` nests the blocks of a ``MomentumNet`` under ``network`` (``network.0.weight``,
    ``network.init.*``); inertia registers them directly (``0.weight``, ``init.*``). Keys of
    enclosing models keep their prefix (``encoder.network.0.weight`` becomes ``encoder.0.weight``).

    ``momentumnet``'s ``transform_to_momentumnet`` also wraps each stack it converts in
    ``nn.Sequential``: with ``keep_first_layer``, block ``N + 1`` of ``layer1`` is saved as
    ``layer1.1.0.network.N.*``, without it block ``N`` as ``layer1.0.network.N.*``. Name those
    stacks in ``sub_layers`` and the keys become those of the original model, which inertia's
    `transform_to_momentumnet` keeps (``layer1.2.conv1.weight``).

    Args:
        state_dict: The state_dict that ``momentumnet`` saved.
        sub_layers: The stacks that ``momentumnet``'s ``transform_to_momentumnet`` converted, as
            passed to it (its default is ``["layer1", "layer2", "layer3", "layer4"]``); None
            for ``MomentumNet`` modules built by hand.
        keep_first_layer: As passed to ``momentumnet``'s ``transform_to_momentumnet``.

    Returns:
        A new state_dict with inertia's keys and the same values.

    Raises:
        InertiaError: A stack of ``sub_layers`` has no key in the layout that
            ``keep_first_layer`` gives, or two keys would become one.

    Examples:
        >>> old = {"network.0.weight": torch.ones(3, 3), "network.0.bias": torch.zeros(3)}
        >>> sorted(from_momentumnet_state_dict(old))
        ['0.bias', '0.weight']
        >>> converted = {"layer1.0.conv1.weight": 0, "layer1.1.0.network.0.conv1.weight": 1}
        >>> sorted(from_momentumnet_state_dict(converted, ["layer1"]))
        ['layer1.0.conv1.weight', 'layer1.1.conv1.weight']
    """
    shift, nest = (1, "1.0.network") if keep_first_layer else (0, "0.network")
    renamed: dict[str, Any] = dict(state_dict)
    for stack in sub_layers or ():
        pattern = re.compile(rf"^{re.escape(stack)}\.{re.escape(nest)}\.(\d+)\.")
        found = [pattern.match(key) for key in renamed]
        if not any(found):
            raise InertiaError(
                f"no key of {stack!r} starts with '{stack}.{nest}.', where momentumnet's "
                f"transform_to_momentumnet with keep_first_layer={keep_first_layer} saves its "
                "blocks: check sub_layers and keep_first_layer."
            )
        renamed = {
            (f"{stack}.{int(m[1]) + shift}.{key[m.end() :]}" if m else key): value
            for (key, value), m in zip(renamed.items(), found, strict=True)
        }
    out = {_MOMENTUMNET_KEY.sub(r"\1", key): value for key, value in renamed.items()}
    if len(out) != len(state_dict):
        raise InertiaError("renaming momentumnet keys made two keys equal; load them by hand.")
    return out
