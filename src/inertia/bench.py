"""Memory and time of residual stacks, side by side in one run: the one benchmark implementation.

Variants, all on the same blocks and inputs:

- ``plain``: ``x = x + f(x)`` with ordinary autograd;
- ``checkpoint``: the same with ``torch.utils.checkpoint`` around every block;
- ``momentum_backprop``: `MomentumNet` with ``use_backprop=True``;
- ``momentum_free``: `MomentumNet` with ``use_backprop=False`` (memory-free backward);
- ``momentum_exact``: the same with ``exact=True`` (fixed point, bit-exact inverse).

Memory is counted as bytes saved for backward (`inertia.testing.SavedTensorMeter`, parameters
excluded), after the forward and at the peak over forward and backward: exact and repeatable on any
device. Non-reentrant checkpointing keeps its inputs outside autograd's saved tensors, where hooks
cannot see them, so its bytes are counted with the reentrant variant, which keeps the same inputs
through ``save_for_backward``; its time is that of the recommended non-reentrant variant. Time is
the median over interleaved training steps (forward, backward), so that drift of a noisy machine
affects every variant alike; ratios are against ``plain`` at the same depth.
"""

from __future__ import annotations

import copy
import csv
import functools
import importlib.util
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .nn import MomentumNet
from .testing import SavedTensorMeter

__all__ = [
    "BenchConfig",
    "BenchRow",
    "ModelBenchConfig",
    "checkpoint_every_block",
    "measure",
    "run",
    "run_models",
    "write_csv",
    "write_markdown",
]

VARIANTS = ("plain", "checkpoint", "momentum_backprop", "momentum_free", "momentum_exact")
#: The paper's package, measured as a baseline when it is installed (``pip install momentumnet``).
PAPER = "momentumnet_0.10"


def default_variants() -> tuple[str, ...]:
    """`VARIANTS`, and the paper's package (`PAPER`) when it is importable."""
    return VARIANTS + ((PAPER,) if importlib.util.find_spec("momentumnet") else ())


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. Defaults: the fixed configuration of the README's speed figure."""

    depths: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256)
    width: int = 512
    batch: int = 256
    gamma: float = 0.9
    repeats: int = 7
    threads: int | None = 2
    variants: tuple[str, ...] = field(default_factory=default_variants)
    batches: tuple[int, ...] = ()  # a sweep over batch sizes too; empty: ``batch`` only
    device: str = "cpu"
    seed: int = 0
    time_steps: bool = True


@dataclass(frozen=True)
class BenchRow:
    """One variant at one depth."""

    variant: str
    case: str  # "mlp" for the depth sweep, else the model's name
    depth: int  # residual blocks in the network
    saved_bytes: int  # held for backward after the forward
    peak_saved_bytes: int  # most held at once over forward and backward
    step_ms: float  # median training step; nan when not timed
    step_ms_min: float
    step_ms_max: float
    time_ratio: float = field(default=float("nan"))  # step_ms / plain's, same case and depth
    memory_ratio: float = field(default=float("nan"))  # peak / plain's, same case and depth


class _Residual(nn.Module):
    """The plain residual stack ``x = x + f(x)``."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        for f in self.blocks:
            x = x + f(x)
        return x


def _blocks(config: BenchConfig, depth: int) -> list[nn.Module]:
    w = config.width
    return [nn.Sequential(nn.Linear(w, w), nn.GELU(), nn.Linear(w, w)) for _ in range(depth)]


def _model(variant: str, blocks: list[nn.Module], gamma: float, for_memory: bool) -> nn.Module:
    if variant == "plain":
        return _Residual(blocks)
    if variant == "checkpoint":
        return checkpoint_every_block(_Residual(blocks), ["blocks"], reentrant=for_memory)
    if variant == "momentum_backprop":
        return MomentumNet(blocks, gamma, use_backprop=True)
    if variant == "momentum_free":
        return MomentumNet(blocks, gamma, use_backprop=False)
    if variant == "momentum_exact":
        return MomentumNet(blocks, gamma, use_backprop=False, exact=True)
    if variant == PAPER:
        import momentumnet

        net: nn.Module = momentumnet.MomentumNet(blocks, gamma, use_backprop=False)
        return net
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join((*VARIANTS, PAPER))}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(config: BenchConfig, progress: Callable[[str], None] | None = None) -> list[BenchRow]:
    """Measure every variant at every depth; returns one row per (variant, depth)."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    rows: list[BenchRow] = []
    batches = config.batches or (config.batch,)
    for batch in batches:
        case = "mlp" if len(batches) == 1 else f"mlp batch {batch}"
        for depth in config.depths:
            torch.manual_seed(config.seed)
            blocks = [b.to(device) for b in _blocks(config, depth)]
            x = torch.randn(batch, config.width, device=device, requires_grad=True)
            builders = {
                v: functools.partial(_model, v, blocks, config.gamma) for v in config.variants
            }
            results = measure(builders, (x,), config.repeats if config.time_steps else 0, device)
            rows += [BenchRow(v, case, depth, *results[v]) for v in config.variants]
            if progress is not None:
                progress(f"{case}, depth {depth}: done")
    return _with_ratios(rows)


def measure(
    builders: Mapping[str, Callable[[bool], nn.Module]],
    inputs: tuple[Any, ...],
    repeats: int,
    device: torch.device,
) -> dict[str, tuple[int, int, float, float, float]]:
    """Bytes saved for backward and step times of each variant (``builders[v](for_memory)``).

    Returns, per variant: bytes held after the forward, peak bytes, and the median, min and max
    step time in ms over ``repeats`` interleaved steps (nan when ``repeats`` is 0).
    """
    memory = {}
    for variant, build in builders.items():
        model = build(True)
        with SavedTensorMeter(ignore=model.parameters()) as meter:
            loss = _loss(model(*inputs))
            after_forward = meter.current
            loss.backward()  # type: ignore[no-untyped-call]
        memory[variant] = (after_forward, meter.peak)
    models = {v: build(False) for v, build in builders.items()}
    times: dict[str, list[float]] = {v: [] for v in builders}
    for r in range(repeats + 1 if repeats else 0):  # the first round warms up
        for variant, model in models.items():
            model.zero_grad(set_to_none=True)
            _sync(device)
            start = time.perf_counter()
            _loss(model(*inputs)).backward()  # type: ignore[no-untyped-call]
            _sync(device)
            if r:
                times[variant].append(1e3 * (time.perf_counter() - start))
    results: dict[str, tuple[int, int, float, float, float]] = {}
    for variant in builders:
        t = times[variant] or [float("nan")]
        results[variant] = (*memory[variant], statistics.median(t), min(t), max(t))
    return results


def _loss(out: Any) -> Tensor:
    out = getattr(out, "logits", getattr(out, "last_hidden_state", out))
    return out.float().square().mean()  # type: ignore[no-any-return]


def _with_ratios(rows: list[BenchRow]) -> list[BenchRow]:
    plain = {(r.case, r.depth): r for r in rows if r.variant == "plain"}
    out = []
    for r in rows:
        base = plain.get((r.case, r.depth))
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


def write_markdown(rows: Sequence[BenchRow], path: Path, command: str, description: str) -> None:
    """A table per quantity (variants as columns, depths or models as rows), with the command."""
    variants = list(dict.fromkeys(r.variant for r in rows))
    cases = list(dict.fromkeys((r.case, r.depth) for r in rows))
    sweep = all(case.startswith("mlp") for case, _ in cases)
    several = len({case for case, _ in cases}) > 1
    cell = {(r.variant, r.case, r.depth): r for r in rows}

    def table(title: str, fmt: Callable[[BenchRow], str]) -> list[str]:
        head = "depth" if sweep else "model (blocks)"
        lines = [f"### {title}", "", f"| {head} | " + " | ".join(variants) + " |"]
        lines.append("|---" * (len(variants) + 1) + "|")
        for case, depth in cases:
            label = f"{case} ({depth})" if not sweep or several else str(depth)
            cells = [fmt(cell[v, case, depth]) for v in variants if (v, case, depth) in cell]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return [*lines, ""]

    lines = [
        f"Produced by `{command}` ({environment()}).",
        "",
        description,
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


def describe(config: BenchConfig) -> str:
    """The depth sweep's configuration, in one sentence for the results table."""
    return (
        f"Blocks Linear({config.width})-GELU-Linear({config.width}), batch {config.batch}, "
        f"gamma {config.gamma}; time: median of {config.repeats} interleaved steps "
        "[min-max], ratio to plain in parentheses."
    )


@dataclass(frozen=True)
class ModelBenchConfig:
    """Converted real models against the original and against checkpointing every block."""

    models: tuple[str, ...] = ("resnet50", "resnet101", "transformer12")
    image_size: int = 64
    image_batch: int = 16
    seq_len: int = 128
    seq_batch: int = 8
    gamma: float = 0.9
    repeats: int = 5
    threads: int | None = 2
    seed: int = 0


class _Checkpointed(nn.Module):
    """A block run under ``torch.utils.checkpoint`` (non-tensor and mask arguments captured)."""

    def __init__(self, block: nn.Module, reentrant: bool) -> None:
        super().__init__()
        self.block, self.reentrant = block, reentrant

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # parents inspect their layers (nn.TransformerEncoder's fast path)
            return getattr(self._modules["block"], name)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(
            functools.partial(self.block, *(), **kwargs), x, *args, use_reentrant=self.reentrant
        )


def checkpoint_every_block(
    model: nn.Module, paths: Sequence[str], reentrant: bool = False
) -> nn.Module:
    """A copy of ``model`` whose stacks at ``paths`` run each block under checkpoint: the
    baseline that the memory-free stacks are compared with."""
    model = copy.deepcopy(model)
    for path in paths:
        stack = _stack(model, path)
        for i, block in enumerate(list(stack)):
            stack[i] = _Checkpointed(block, reentrant)
    return model


def _stack(model: nn.Module, path: str) -> nn.Sequential | nn.ModuleList:
    stack = model.get_submodule(path)
    assert isinstance(stack, (nn.Sequential, nn.ModuleList))
    return stack


def _builders(
    model: nn.Module, paths: list[str], keep_first: bool, gamma: float
) -> dict[str, Callable[[bool], nn.Module]]:
    from .transform import transform_to_momentumnet

    def momentum(checkpointed: bool, for_memory: bool) -> nn.Module:
        return transform_to_momentumnet(
            model,
            paths,
            keep_first_layer=keep_first,
            gamma=gamma,
            checkpoint_kept=checkpointed,
            checkpoint_stem=checkpointed,
        )

    builders: dict[str, Callable[[bool], nn.Module]] = {
        "plain": lambda for_memory: model,
        "checkpoint": functools.partial(checkpoint_every_block, model, paths),
        "momentum_free": functools.partial(momentum, False),
    }
    if keep_first:
        builders["momentum_free_ckpt_stem_first"] = functools.partial(momentum, True)
    return builders


def _real_model(name: str, config: ModelBenchConfig) -> tuple[nn.Module, tuple[Tensor], list[str]]:
    """(model in train mode, inputs, stack paths) for a benchmark model."""
    if name.startswith("resnet"):
        from torchvision import models as tvm

        model: nn.Module = getattr(tvm, name)(num_classes=10)
        x = torch.randn(
            config.image_batch, 3, config.image_size, config.image_size
        ).requires_grad_()
        return model.train(), (x,), ["layer1", "layer2", "layer3", "layer4"]
    if name.startswith("transformer"):
        layers = int(name.removeprefix("transformer"))
        layer = nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True)
        model = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        x = torch.randn(config.seq_batch, config.seq_len, 256, requires_grad=True)
        return model.train(), (x,), ["layers"]
    raise ValueError(f"unknown benchmark model {name!r}: resnet<N> or transformer<layers>")


def run_models(
    config: ModelBenchConfig, progress: Callable[[str], None] | None = None
) -> list[BenchRow]:
    """Original, checkpointing every block, and memory-free momentum, for each model."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    rows: list[BenchRow] = []
    for name in config.models:
        torch.manual_seed(config.seed)
        model, inputs, paths = _real_model(name, config)
        builders = _builders(model, paths, name.startswith("resnet"), config.gamma)
        results = measure(builders, inputs, config.repeats, torch.device("cpu"))
        depth = sum(len(_stack(model, p)) for p in paths)
        rows += [BenchRow(v, name, depth, *results[v]) for v in builders]
        if progress is not None:
            progress(f"{name}: done")
    return _with_ratios(rows)
