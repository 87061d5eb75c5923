"""`MomentumLayerList`: a momentum stack for parents that loop over their layers themselves."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import Tensor
from torch.utils import _pytree as pytree

from ._errors import InertiaError
from .nn import MomentumNet

__all__ = ["MomentumLayerList"]


class MomentumLayerList(MomentumNet):
    """A `MomentumNet` for a parent module that runs its layers in its own loop.

    Transformer encoders and decoders (``nn.TransformerEncoder``, HuggingFace's ``BertEncoder``,
    ``GPT2Model``, ``LlamaModel``) keep their layers in an ``nn.ModuleList`` and call them one by
    one: ``for layer in self.layers: x = layer(x, mask=...)``. Iterating this stack yields one
    entry per block, so ``len``, indexing (which returns the blocks) and the parent's loop keep
    working: the first entry runs the whole momentum stack with the arguments the parent passes,
    and the others return its output unchanged, after checking that the parent passes them that
    output and the same arguments (otherwise the conversion would be silently wrong, and they
    raise). `transform_to_momentumnet` uses it for ``nn.ModuleList`` stacks.

    Blocks may return a tuple whose first element is the new hidden state (HuggingFace layers
    before transformers 5 do); the stack then returns ``(x_N,)``, and the other elements
    (attention weights, per-layer caches) are not available.
    """

    _unpack_tuples = True

    def forward(self, x: Tensor, *args: Any, return_velocity: bool = False, **kwargs: Any) -> Any:
        """As `MomentumNet.forward`; a 1-tuple ``(x_N,)`` when the blocks return tuples."""
        state, spec = self._run(x, args, kwargs, velocity=return_velocity)
        x_n = spec.arith.position(state)
        if return_velocity:
            return x_n, spec.arith.velocity(state)
        return (x_n,) if spec.seen.get("tuple") else x_n

    def __iter__(self) -> Iterator[Any]:
        run = _StackRun(self)
        return iter([_StackEntry(run, i) for i in range(len(self))])


class _StackRun:
    """One pass of a parent's loop over a `MomentumLayerList`."""

    def __init__(self, stack: MomentumLayerList) -> None:
        self.stack = stack
        self.output: Any = None
        self.args: tuple[Any, ...] = ()
        self.kwargs: dict[str, Any] = {}


class _StackEntry:
    """What the parent's loop calls for block ``index``; other attributes are the block's."""

    def __init__(self, run: _StackRun, index: int) -> None:
        self._run, self._index = run, index

    def __getattr__(self, name: str) -> Any:
        return getattr(self._run.stack[self._index], name)

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        run = self._run
        if self._index == 0:
            run.output = run.stack(x, *args, **kwargs)
            run.args, run.kwargs = args, kwargs
            return run.output
        hidden = run.output[0] if isinstance(run.output, tuple) else run.output
        if x is not hidden or not _same_arguments((args, kwargs), (run.args, run.kwargs)):
            raise InertiaError(
                f"the parent of this converted stack passes layer {self._index} another input or "
                "other arguments than layer 0, so it does more than chain its layers; "
                "inertia cannot convert such a loop. Convert a stack whose parent only calls "
                "x = layer(x, *same_arguments) for each layer."
            )
        return run.output


def _same_arguments(a: Any, b: Any) -> bool:
    leaves_a, spec_a = pytree.tree_flatten(a)
    leaves_b, spec_b = pytree.tree_flatten(b)
    if spec_a != spec_b:
        return False
    return all(
        u is w if isinstance(u, Tensor) or isinstance(w, Tensor) else u is w or u == w
        for u, w in zip(leaves_a, leaves_b, strict=True)
    )
