"""What a block's recomputation must reproduce of its forward: random numbers, autocast, norm stats.

- Random numbers: the default generators' state before a block is kept only when the block changed
  it (it drew random numbers, as dropout does), and restored before that block's recomputation;
  so is the state of each generator of the block's own that it passed as ``generator=``
  (`GeneratorWatch`), which ``torch.utils.checkpoint`` alone does not replay.
- Autocast: the forward's autocast state is captured once and re-entered around the recomputation.
- Norm layers: running statistics (BatchNorm, InstanceNorm with ``track_running_stats``) are updated
  by the forward only; the recomputation's update is undone, so one training step updates them once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

__all__ = [
    "AutocastState",
    "GeneratorWatch",
    "RngTracker",
    "StatsOnce",
    "checkpointed_call",
    "frozen_running_stats",
    "replaying",
    "running_statistics",
]


class RngTracker:
    """Reads and writes the default generators a computation on ``device`` can draw from.

    The CPU generator always; the generator of ``device`` when it is an accelerator; and, where
    CUDA is initialized, those of every CUDA device (a block may draw on another device than its
    input's).
    """

    def __init__(self, device: torch.device) -> None:
        self.devices = [] if device.type == "cpu" else [device]  # a tensor's: cuda:i, not cuda
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            cuda = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
            self.devices += [d for d in cuda if d not in self.devices]

    def get_state(self) -> tuple[Tensor, ...]:
        states = [torch.get_rng_state()]
        for device in self.devices:
            states.append(torch.get_device_module(device.type).get_rng_state(device))
        return tuple(states)

    def set_state(self, states: tuple[Tensor, ...]) -> None:
        torch.set_rng_state(states[0])
        for device, state in zip(self.devices, states[1:], strict=True):
            torch.get_device_module(device.type).set_rng_state(state, device)

    @contextlib.contextmanager
    def fork(self) -> Iterator[None]:
        """Restore the tracked generators on exit: replaying leaves the caller's RNG untouched."""
        saved = self.get_state()
        try:
            yield
        finally:
            self.set_state(saved)


class GeneratorWatch(TorchFunctionMode):
    """Notes each generator passed as ``generator=`` and its state before its first use."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[int, tuple[torch.Generator, Tensor]] = {}

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        generator = kwargs.get("generator")
        if isinstance(generator, torch.Generator) and id(generator) not in self.seen:
            self.seen[id(generator)] = generator, generator.get_state()
        return func(*args, **kwargs)


@contextlib.contextmanager
def replaying(generators: Sequence[torch.Generator], states: Sequence[Tensor]) -> Iterator[None]:
    """``generators`` set to ``states``, then back to where they are now."""
    now = [g.get_state() for g in generators]
    try:
        for g, state in zip(generators, states, strict=True):
            g.set_state(state)
        yield
    finally:
        for g, state in zip(generators, now, strict=True):
            g.set_state(state)


def same_state(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> bool:
    return all(torch.equal(s, t) for s, t in zip(a, b, strict=True))


@dataclass(frozen=True)
class AutocastState:
    """Autocast settings of the forward, for the device type of the input and for the CPU."""

    settings: tuple[tuple[str, bool, torch.dtype], ...]
    cache_enabled: bool

    @classmethod
    def capture(cls, device: torch.device) -> AutocastState:
        types = dict.fromkeys((device.type, "cpu"))
        settings = tuple(
            (t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in types
        )
        return cls(settings, torch.is_autocast_cache_enabled())

    @contextlib.contextmanager
    def enter(self) -> Iterator[None]:
        """Autocast as it was captured (nothing to enter where it is so already)."""
        if self == AutocastState.capture(torch.device(self.settings[0][0])):
            yield
            return
        with contextlib.ExitStack() as stack:
            for device_type, enabled, dtype in self.settings:
                stack.enter_context(
                    torch.autocast(
                        device_type, dtype=dtype, enabled=enabled, cache_enabled=self.cache_enabled
                    )
                )
            yield


def running_statistics(
    module: nn.Module, modules: Iterable[tuple[str, nn.Module]] | None = None
) -> dict[str, Tensor]:
    """The buffers that the norm layers of ``module`` in training mode update in their forward,
    by name (as in ``module.named_buffers()``). ``modules``: its named submodules, where a walk
    was made already."""
    return {
        f"{prefix}.{name}" if prefix else name: buffer
        for prefix, m in (module.named_modules() if modules is None else modules)
        if isinstance(m, _NormBase) and m.training and m.track_running_stats
        for name in ("running_mean", "running_var", "num_batches_tracked")
        if (buffer := getattr(m, name)) is not None
    }


@contextlib.contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Run ``module`` without keeping the running-statistics updates of its norm layers."""
    buffers = list(running_statistics(module).values())
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved, strict=True):
                b.copy_(s)


class StatsOnce:
    """``fn`` for ``torch.utils.checkpoint``, whose recomputation (its second call) replays what
    checkpointing alone does not: the running statistics of the norm layers in ``module`` are
    kept as the first call left them, so that one training step updates them once, and each
    generator of the block's own that the first call passed as ``generator=`` starts from the
    state it had then (``torch.utils.checkpoint`` replays the default generators only), so that
    the recomputation draws the forward's random numbers."""

    def __init__(self, fn: Callable[..., Any], module: nn.Module) -> None:
        self.fn, self.module, self.calls = fn, module, 0
        self.generators: tuple[torch.Generator, ...] = ()
        self.states: tuple[Tensor, ...] = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            watch = GeneratorWatch()
            with watch:
                out = self.fn(*args, **kwargs)
            self.generators = tuple(g for g, _ in watch.seen.values())
            self.states = tuple(s for _, s in watch.seen.values())
            return out
        with frozen_running_stats(self.module), replaying(self.generators, self.states):
            return self.fn(*args, **kwargs)


def checkpointed_call(module: nn.Module) -> Callable[..., Any]:
    """``module``'s call under ``torch.utils.checkpoint`` (non-reentrant), replaying its norm
    statistics and its own generators as `StatsOnce` does."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(StatsOnce(module, module), *args, use_reentrant=False, **kwargs)

    return call
