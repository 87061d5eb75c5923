"""Memory and time of residual stacks, side by side in one run: the one benchmark implementation.

Variants, all on the same blocks and inputs:

- ``plain``: ``x = x + f(x)`` with ordinary autograd;
- ``checkpoint``: the same with ``torch.utils.checkpoint`` around every block;
- ``momentum_backprop``: `MomentumNet` with ``use_backprop=True``;
- ``momentum_free``: `MomentumNet` with ``use_backprop=False`` (memory-free backward).

Memory is counted as bytes saved for backward (`inertia.testing.SavedTensorMeter`, parameters
excluded), after the forward and at the peak over forward and backward: exact and repeatable on any
device. Non-reentrant checkpointing keeps its inputs outside autograd's saved tensors, where hooks
cannot see them, so its bytes are counted with the reentrant variant, which keeps the same inputs
through ``save_for_backward``; its time is that of the recommended non-reentrant variant. Time is
the median over interleaved training steps (forward, backward), so that drift of a noisy machine
affects every variant alike; ratios are against ``plain`` at the same depth.
"""

from __future__ import annotations

import csv
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .nn import MomentumNet
from .testing import SavedTensorMeter

__all__ = ["BenchConfig", "BenchRow", "run", "write_csv", "write_markdown"]

VARIANTS = ("plain", "checkpoint", "momentum_backprop", "momentum_free")


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. Defaults: the fixed configuration of the README's speed figure."""

    depths: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256)
    width: int = 512
    batch: int = 256
    gamma: float = 0.9
    repeats: int = 7
    threads: int | None = 2
    variants: tuple[str, ...] = VARIANTS
    device: str = "cpu"
    seed: int = 0
    time_steps: bool = True


@dataclass(frozen=True)
class BenchRow:
    """One variant at one depth."""

    variant: str
    depth: int
    saved_bytes: int  # held for backward after the forward
    peak_saved_bytes: int  # most held at once over forward and backward
    step_ms: float  # median training step; nan when not timed
    step_ms_min: float
    step_ms_max: float
    time_ratio: float = field(default=float("nan"))  # step_ms / plain's step_ms at this depth
    memory_ratio: float = field(default=float("nan"))  # peak / plain's peak at this depth


class _Residual(nn.Module):
    def __init__(self, blocks: Sequence[nn.Module], use_checkpoint: bool, reentrant: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.use_checkpoint, self.reentrant = use_checkpoint, reentrant

    def forward(self, x: Tensor) -> Tensor:
        for f in self.blocks:
            if self.use_checkpoint:
                out = checkpoint(f, x, use_reentrant=self.reentrant)
                assert isinstance(out, Tensor)
                x = x + out
            else:
                x = x + f(x)
        return x


def _blocks(config: BenchConfig, depth: int) -> list[nn.Module]:
    w = config.width
    return [nn.Sequential(nn.Linear(w, w), nn.GELU(), nn.Linear(w, w)) for _ in range(depth)]


def _model(variant: str, blocks: list[nn.Module], gamma: float, for_memory: bool) -> nn.Module:
    if variant == "plain":
        return _Residual(blocks, use_checkpoint=False, reentrant=False)
    if variant == "checkpoint":
        return _Residual(blocks, use_checkpoint=True, reentrant=for_memory)
    if variant == "momentum_backprop":
        return MomentumNet(blocks, gamma, use_backprop=True)
    if variant == "momentum_free":
        return MomentumNet(blocks, gamma, use_backprop=False)
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def _step(model: nn.Module, x: Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(config: BenchConfig, progress: Callable[[str], None] | None = None) -> list[BenchRow]:
    """Measure every variant at every depth; returns one row per (variant, depth)."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    rows: list[BenchRow] = []
    for depth in config.depths:
        torch.manual_seed(config.seed)
        blocks = [b.to(device) for b in _blocks(config, depth)]
        x = torch.randn(config.batch, config.width, device=device, requires_grad=True)
        memory = {}
        for variant in config.variants:
            model = _model(variant, blocks, config.gamma, for_memory=True)
            with SavedTensorMeter(ignore=model.parameters()) as meter:
                out = model(x)
                after_forward = meter.current
                out.square().mean().backward()
            memory[variant] = (after_forward, meter.peak)
        models = {v: _model(v, blocks, config.gamma, for_memory=False) for v in config.variants}
        times: dict[str, list[float]] = {v: [] for v in config.variants}
        if config.time_steps:
            for r in range(config.repeats + 1):  # the first round warms up
                for variant, model in models.items():
                    _sync(device)
                    start = time.perf_counter()
                    _step(model, x)
                    _sync(device)
                    if r:
                        times[variant].append(1e3 * (time.perf_counter() - start))
        for variant in config.variants:
            t = times[variant] or [float("nan")]
            rows.append(
                BenchRow(variant, depth, *memory[variant], statistics.median(t), min(t), max(t))
            )
        if progress is not None:
            progress(f"depth {depth}: done")
    return _with_ratios(rows)


def _with_ratios(rows: list[BenchRow]) -> list[BenchRow]:
    plain = {r.depth: r for r in rows if r.variant == "plain"}
    out = []
    for r in rows:
        base = plain.get(r.depth)
        if base is None:
            out.append(r)
            continue
        d = asdict(r)
        d["time_ratio"] = r.step_ms / base.step_ms if base.step_ms else float("nan")
        d["memory_ratio"] = r.peak_saved_bytes / base.peak_saved_bytes
        out.append(BenchRow(**d))
    return out


def environment() -> str:
    """One line naming what the figures were measured on."""
    threads = torch.get_num_threads()
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    return f"torch {torch.__version__}, {dev or platform.machine()}, {threads} threads"


def write_csv(rows: Iterable[BenchRow], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([f.name for f in fields(BenchRow)])
        for r in rows:
            writer.writerow([f"{v:.4g}" if isinstance(v, float) else v for v in asdict(r).values()])


def write_markdown(rows: Sequence[BenchRow], path: Path, command: str, config: BenchConfig) -> None:
    """A table per quantity (variants as columns, depths as rows), with the command that made it."""
    variants = list(dict.fromkeys(r.variant for r in rows))
    depths = list(dict.fromkeys(r.depth for r in rows))
    cell = {(r.variant, r.depth): r for r in rows}

    def table(title: str, fmt: Callable[[BenchRow], str]) -> list[str]:
        lines = [f"### {title}", "", "| depth | " + " | ".join(variants) + " |"]
        lines.append("|---" * (len(variants) + 1) + "|")
        for d in depths:
            lines.append(f"| {d} | " + " | ".join(fmt(cell[v, d]) for v in variants) + " |")
        return [*lines, ""]

    lines = [
        f"Produced by `{command}` ({environment()}).",
        "",
        f"Blocks Linear({config.width})-GELU-Linear({config.width}), batch {config.batch}, "
        f"gamma {config.gamma}; time: median of {config.repeats} interleaved steps "
        "[min-max], ratio to plain in parentheses.",
        "",
        *table(
            "Peak bytes saved for backward (MiB), ratio to plain",
            lambda r: f"{r.peak_saved_bytes / 2**20:.2f} ({r.memory_ratio:.2f}x)",
        ),
        *table(
            "Training step (ms), ratio to plain",
            lambda r: (
                f"{r.step_ms:.0f} [{r.step_ms_min:.0f}-{r.step_ms_max:.0f}] ({r.time_ratio:.2f}x)"
            ),
        ),
    ]
    path.write_text("\n".join(lines))
