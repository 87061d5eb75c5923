"""Checks that inertia's own tests use, public so that users can run them on their models.

- `SavedTensorMeter`: bytes saved for backward, live and peak, through the backward too.
- `LiveTensorMeter`: bytes of every tensor that operations create and that are still alive, and
  what was alive at the peak, tensor by tensor: the live set of a training step.
- `relative_error` and `TOLERANCES`: the one definition of "equal" (``||a - b|| / ||b||``).
- `gradient_errors` / `assert_gradients_match`: a model against a reference on the same weights and
  inputs: outputs, input gradients, every parameter's gradient and every buffer, by name.
- `backprop_twin`: the reference for a memory-free model: a copy that backpropagates through the
  same arithmetic.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "TOLERANCES",
    "LiveTensor",
    "LiveTensorMeter",
    "SavedTensorMeter",
    "assert_gradients_match",
    "backprop_twin",
    "gradient_errors",
    "relative_error",
    "storage_key",
]

#: Relative error (``||a - b|| / ||b||``) allowed per tensor when two computations should agree.
TOLERANCES: dict[torch.dtype, float] = {torch.float64: 1e-10, torch.float32: 1e-5}


def relative_error(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / ||b||`` in float64; 0 when both are zero, inf when only ``b`` is."""
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    num, den = float((a - b).norm()), float(b.norm())
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


class _Packed:
    """What the pack hook stores: the tensor, and a callback when autograd frees it."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


class SavedTensorMeter:
    """Counts the bytes autograd saves for backward while active, each storage once.

    A saved view counts its whole storage, since that is what it keeps alive.

    Keep it active through the backward to see the recomputation's saved tensors as well: ``peak``
    is then the most bytes held at once, forward and backward together. Storages of ``ignore``
    (typically the model's parameters, which exist anyway) are not counted.

    Examples:
        >>> lin = nn.Linear(4, 4)
        >>> with SavedTensorMeter(ignore=lin.parameters()) as meter:
        ...     lin(torch.randn(2, 4, requires_grad=True)).sum().backward()
        >>> meter.peak
        32
    """

    def __init__(self, ignore: Iterable[Tensor] = ()) -> None:
        self._ignore = {t.untyped_storage().data_ptr() for t in ignore}
        self._refs: dict[tuple[str, int], int] = {}
        self._sizes: dict[tuple[str, int], int] = {}
        self.current = 0
        self.peak = 0
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: Tensor) -> Any:
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key[1] in self._ignore or storage.nbytes() == 0:
            return tensor
        packed = _Packed(tensor)
        if key not in self._refs:
            self._refs[key] = 0
            self._sizes[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self._refs[key] += 1
        weakref.finalize(packed, self._release, key)
        return packed

    def _release(self, key: tuple[str, int]) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.current -= self._sizes.pop(key)

    @staticmethod
    def _unpack(packed: Any) -> Tensor:
        return packed.tensor if isinstance(packed, _Packed) else packed

    def __enter__(self) -> SavedTensorMeter:
        self._ctx.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._ctx.__exit__(exc_type, exc, tb)


@dataclass(frozen=True)
class LiveTensor:
    """One storage that an operation under a `LiveTensorMeter` created."""

    nbytes: int
    dtype: torch.dtype  # of the tensor that created it
    numel: int  # of that tensor
    op: str  # the operation that created it


class LiveTensorMeter(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Counts the bytes of the storages that operations run under it create, while they live.

    Each storage is counted once, from the operation that returned it until it is freed, which
    the meter sees after each operation (a weak reference to the storage, as torch.compile keeps).
    ``peak`` is the most bytes alive at once and ``at_peak`` what was alive then, storage by
    storage, so that a test can sort the live set by role (by dtype, size, or by storages it knows,
    such as ``.grad`` tensors: `storage_key`). ``largest`` is the most elements of any tensor
    created, by dtype. Tensors that existed before (a stack's saved state, the parameters) are not
    counted. ``roles`` names predicates on `LiveTensor`: ``peaks[name]`` is then the most bytes
    alive at once among the storages it accepts, at any moment, not only at the overall peak.
    Deterministic, on any device; it runs each operation eagerly (dynamo compiles nothing under a
    dispatch mode, so inertia's integer kernels run their chunked eager forms).

    Examples:
        >>> with LiveTensorMeter({"large": lambda t: t.numel >= 256}) as meter:
        ...     y = torch.ones(256).mul(2).sum()
        >>> meter.peak, meter.peaks["large"], meter.largest[torch.float32]
        (2048, 2048, 256)
    """

    def __init__(self, roles: Mapping[str, Callable[[LiveTensor], bool]] | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._live: dict[int, tuple[StorageWeakRef, LiveTensor]] = {}
        self._bytes = 0
        self.peak = 0
        self.at_peak: dict[int, LiveTensor] = {}
        self.largest: dict[torch.dtype, int] = {}
        self.roles = dict(roles or {})
        self.peaks = dict.fromkeys(self.roles, 0)

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: Any = (),
        kwargs: Any = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        # A view, or an operation in place, returns a storage its inputs have: not a new one.
        inputs = {
            storage_key(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)
        }
        self._prune()
        for t in pytree.tree_leaves(out):
            if not isinstance(t, Tensor):
                continue
            self.largest[t.dtype] = max(self.largest.get(t.dtype, 0), t.numel())
            storage = t.untyped_storage()
            key = storage_key(t)
            if key in self._live or key in inputs or storage.nbytes() == 0:
                continue
            entry = LiveTensor(storage.nbytes(), t.dtype, t.numel(), str(func))
            self._live[key] = (StorageWeakRef(storage), entry)  # type: ignore[no-untyped-call]
            self._bytes += entry.nbytes
        if self._bytes > self.peak:
            self.peak = self._bytes
            self.at_peak = {key: entry for key, (_, entry) in self._live.items()}
        for name, accepts in self.roles.items():
            self.peaks[name] = max(self.peaks[name], self._bytes_of(accepts))
        return out

    def _prune(self) -> None:
        for key, (ref, entry) in list(self._live.items()):
            if ref.expired():  # type: ignore[no-untyped-call]
                del self._live[key]
                self._bytes -= entry.nbytes

    @property
    def current(self) -> int:
        """Bytes of the storages made under the meter that are alive now."""
        self._prune()
        return self._bytes

    def alive(self, role: str) -> int:
        """Bytes of the storages made under the meter that are alive now and that ``role``
        accepts."""
        self._prune()
        return self._bytes_of(self.roles[role])

    def _bytes_of(self, accepts: Callable[[LiveTensor], bool]) -> int:
        return sum(entry.nbytes for _, entry in self._live.values() if accepts(entry))


def storage_key(t: Tensor) -> int:
    """The key of ``t``'s storage in `LiveTensorMeter.at_peak`."""
    return int(t.untyped_storage()._cdata)


def backprop_twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose momentum stacks use ordinary autograd (``use_backprop=True``)
    with the arithmetic ``model``'s stacks have (exact mode pinned where it is on, as it is by
    default when memory-free): the reference that `assert_gradients_match` compares a memory-free
    model with. Weights, buffers and modes are copied; the two then evolve independently.

    Examples:
        >>> from inertia import MomentumNet
        >>> net = MomentumNet([nn.Linear(4, 4) for _ in range(3)], gamma=0.9, use_backprop=False)
        >>> twin = backprop_twin(net)
        >>> twin.use_backprop, twin.exact
        (True, True)
    """
    from .nn import MomentumNet

    twin = copy.deepcopy(model)
    for stack in twin.modules():
        if isinstance(stack, MomentumNet):
            stack.exact = stack.exact  # pins what it resolves to now, before use_backprop flips
            stack.use_backprop = True
    return twin


def _default_loss(out: Any) -> Tensor:
    outs = out if isinstance(out, tuple) else (out,)
    # A fixed, non-symmetric weighting so that every output element matters differently.
    total = torch.zeros((), dtype=torch.float64)
    for o in outs:
        w = torch.linspace(-1.0, 2.0, o.numel(), dtype=o.dtype, device=o.device).view_as(o)
        total = total + (o * w).sum().double() + o.pow(2).sum().double()
    return total


def gradient_errors(
    reference: nn.Module,
    model: nn.Module,
    *inputs: Any,
    loss_fn: Callable[[Any], Tensor] = _default_loss,
    steps: int = 1,
    seed: int | None = None,
    zero_floor: float = 1e-4,
    **kwargs: Any,
) -> dict[str, float]:
    """Relative errors of ``model`` against ``reference`` (same weights) on the same inputs.

    Resets both models' gradients, runs ``steps`` forward/backward passes on each (gradients
    accumulate, as in gradient accumulation), then compares the outputs of the last pass
    (``"output"``), the gradient of each tensor input that requires grad (``"input.i"``), each
    parameter's gradient (``"grad.<name>"``) and each buffer (``"buffer.<name>"``).
    With ``seed``, the generator is seeded before each model runs, so both draw the same random
    numbers (dropout). A parameter whose reference gradient is below ``zero_floor`` times the
    norm of all parameter gradients (an analytically zero gradient, made of rounding noise) is
    compared relative to that global norm instead of its own. Both models are left with their
    gradients and updated buffers.
    """
    results: list[tuple[Any, list[Tensor | None], Mapping[str, Tensor]]] = []
    for net in (reference, model):
        leaves = [
            t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, Tensor) else t
            for t in inputs
        ]
        net.zero_grad(set_to_none=True)
        if seed is not None:
            torch.manual_seed(seed)
        for _ in range(steps):
            out = net(*leaves, **kwargs)
            loss_fn(out).backward()  # type: ignore[no-untyped-call]
        grads = [t.grad if isinstance(t, Tensor) and t.requires_grad else None for t in leaves]
        results.append((out, grads, dict(net.named_buffers())))
    (ref_out, ref_grads, ref_bufs), (out, grads, bufs) = results
    errors: dict[str, float] = {}
    ref_outs = ref_out if isinstance(ref_out, tuple) else (ref_out,)
    outs = out if isinstance(out, tuple) else (out,)
    for i, (a, b) in enumerate(zip(outs, ref_outs, strict=True)):
        errors["output" if len(outs) == 1 else f"output.{i}"] = relative_error(a, b)
    for i, (ga, gb) in enumerate(zip(grads, ref_grads, strict=True)):
        if gb is not None or ga is not None:
            errors[f"input.{i}"] = _grad_error(ga, gb)
    ref_params = dict(reference.named_parameters())
    ref_norms = [p.grad.double().norm() for p in ref_params.values() if p.grad is not None]
    scale = float(torch.stack(ref_norms).norm()) if ref_norms else 0.0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ref = ref_params[name].grad
        if p.grad is not None and ref is not None and float(ref.norm()) < zero_floor * scale:
            # An analytically zero gradient (a bias before a norm layer, an attention key bias)
            # is rounding noise: measure its error against the gradient of the whole model.
            errors[f"grad.{name}"] = float((p.grad.double() - ref.double()).norm()) / scale
        else:
            errors[f"grad.{name}"] = _grad_error(p.grad, ref)
    for name, buf in bufs.items():
        errors[f"buffer.{name}"] = relative_error(buf.double(), ref_bufs[name].double())
    return errors


def _grad_error(a: Tensor | None, b: Tensor | None) -> float:
    if a is None and b is None:
        return 0.0
    if a is None or b is None:
        return float("inf")  # one side has a gradient, the other none
    return relative_error(a, b)


def assert_gradients_match(
    reference: nn.Module,
    model: nn.Module,
    *inputs: Any,
    rtol: float | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """`gradient_errors`, failing when any error exceeds ``rtol``.

    The default ``rtol`` is `TOLERANCES` for the dtype of the first floating-point input, or of the
    model's parameters when no input is floating point (token ids).
    """
    floats = [t for t in (*inputs, *model.parameters()) if isinstance(t, Tensor)]
    dtype = next((t.dtype for t in floats if t.is_floating_point()), torch.float32)
    tol = TOLERANCES[dtype] if rtol is None else rtol
    errors = gradient_errors(reference, model, *inputs, **kwargs)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    if bad:
        worst = sorted(bad.items(), key=lambda kv: -kv[1])[:10]
        lines = "\n".join(f"  {name}: {err:.3e}" for name, err in worst)
        raise AssertionError(
            f"{len(bad)} of {len(errors)} tensors differ by more than {tol:.0e}:\n{lines}"
        )
    return errors
