"""Memory and time of residual stacks, side by side in one run: the one benchmark implementation.

Variants, all on the same blocks and inputs:

- ``plain``: ``x = x + f(x)`` with ordinary autograd;
- ``checkpoint``: the same with ``torch.utils.checkpoint`` around every block;
- ``momentum_backprop``: `MomentumNet` with ``use_backprop=True``;
- ``momentum_free``: `MomentumNet` with ``use_backprop=False, exact=False`` (memory-free backward,
  float arithmetic; in a conversion, ``method="memory_free"`` on every stack);
- ``momentum_exact``: the same with ``exact=True`` (fixed point, bit-exact inverse: the default of
  ``use_backprop=False``);
- ``default``: the conversion as a user writes it, ``transform_to_momentumnet(model, gamma=...)``,
  each stack as its plan chooses (`inertia.plan`), the stem and first blocks of a ResNet
  checkpointed; on a stack alone, `MomentumNet` with ``use_backprop=False``;
- ``checkpoint_whole``, timed only: ``checkpoint`` with each block recomputed whole (`RECOMPUTE`):
  a memory-free stack's inverse reads each block's output, where checkpointing's early stop ends
  the recomputation at the block's last saved tensor (an MLP block's second Linear is skipped),
  so this is the least time that any memory-free stack can take;
- ``floor``, timed only: ``checkpoint_whole`` plus exact mode's integer update and its inverse
  (`IntegerFloor`), the least time that a memory-free exact stack can take;
- on causal LMs trained on their own loss (`PeakCase.labels`), ``checkpoint_chunked``,
  ``default_chunked`` and ``float_chunked`` (`CHUNKED`): HuggingFace's checkpointing, ``default``
  and ``momentum_free``, each with `inertia.use_chunked_loss` (the logits `PeakCase.chunk_tokens`
  tokens at a time), and ``floor_chunked``, ``floor`` with it (timed only);
- on torchvision ResNets in `true_peak`, ``momentum_free_ckpt_stem_first`` and
  ``momentum_exact_ckpt_stem_first`` (`LEAN_RESNET`): the memory-free ones with the stem and each
  stage's first block checkpointed too (``checkpoint_stem=True, checkpoint_kept=True``).

Memory is counted as bytes saved for backward (`inertia.testing.SavedTensorMeter`, parameters
excluded), after the forward and at the peak over forward and backward: exact and repeatable on any
device. Non-reentrant checkpointing keeps its inputs outside autograd's saved tensors, where hooks
cannot see them, so its bytes are counted with the reentrant variant, which keeps the same inputs
through ``save_for_backward``; its time is that of the recommended non-reentrant variant. Time is
the median over interleaved training steps (forward, backward), so that drift of a noisy machine
affects every variant alike; ratios are against ``plain`` at the same depth.

The true peak of a training step, as users measure it (resident memory on the CPU, the CUDA
allocator's peak on a GPU, parameter gradients and every temporary included), is measured by one
function, `true_peak`, each case in a fresh process: ``benchmarks/true_peak.py``
(`run_true_peak`), ``inertia bench --true-peak`` (`BenchConfig.true_peak`) and the memory
experiment call it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .._errors import InertiaError
from ._fresh import TruePeak, time_variants, true_peak
from ._peak import StepPeak, measure_step_peaks
from ._steps import (
    CHUNKED,
    DEFAULT,
    FLOOR,
    LEAN_RESNET,
    LORA_TARGETS,
    PAPER,
    PRECISIONS,
    RECOMPUTE,
    VARIANTS,
    IntegerFloor,
    PeakCase,
    add_lora,
    build,
    checkpoint_every_block,
    default_variants,
    environment,
    loss_of,
    measure,
    mlp_blocks,
    stack_at,
    stack_saved_bytes,
    variant_model,
)
from ._table import (
    PeakConfig,
    PeakRow,
    command_line,
    machine,
    report_true_peak,
    run_true_peak,
    write_dict_rows,
    write_peak_csv,
    write_peak_markdown,
    write_rows,
)

__all__ = [
    "CHUNKED",
    "DEFAULT",
    "FLOOR",
    "LEAN_RESNET",
    "LORA_TARGETS",
    "PAPER",
    "PRECISIONS",
    "RECOMPUTE",
    "VARIANTS",
    "BenchConfig",
    "BenchRow",
    "IntegerFloor",
    "ModelBenchConfig",
    "PeakCase",
    "PeakConfig",
    "PeakRow",
    "StepPeak",
    "TruePeak",
    "add_lora",
    "build",
    "checkpoint_every_block",
    "command_line",
    "environment",
    "loss_of",
    "machine",
    "measure",
    "measure_step_peaks",
    "report_true_peak",
    "run",
    "run_models",
    "run_true_peak",
    "stack_saved_bytes",
    "time_variants",
    "true_peak",
    "write_csv",
    "write_dict_rows",
    "write_markdown",
    "write_peak_csv",
    "write_peak_markdown",
]


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
    timed: tuple[str, ...] = ()  # timed only, beside the variants (`RECOMPUTE`, `FLOOR`)
    batches: tuple[int, ...] = ()  # a sweep over batch sizes too; empty: ``batch`` only
    device: str = "cpu"
    seed: int = 0
    time_steps: bool = True
    true_peak: bool = False  # also the true peak of each step (`true_peak`, fresh processes)


@dataclass(frozen=True)
class BenchRow:
    """One variant at one depth."""

    variant: str
    case: str  # "mlp" for the depth sweep, else the model's name
    depth: int  # residual blocks in the network
    saved_bytes: float  # held for backward after the forward; nan: timed only
    peak_saved_bytes: float  # most held at once over forward and backward; nan: timed only
    step_ms: float  # median training step; nan when not timed
    step_ms_min: float
    step_ms_max: float
    time_ratio: float = field(default=float("nan"))  # step_ms / plain's, same case and depth
    memory_ratio: float = field(default=float("nan"))  # peak / plain's, same case and depth
    true_peak_bytes: float = field(default=float("nan"))  # `true_peak`, .grad unset; nan: unread
    true_peak_accumulate_bytes: float = field(default=float("nan"))  # .grad allocated before


def run(config: BenchConfig, progress: Callable[[str], None] | None = None) -> list[BenchRow]:
    """Measure every variant at every depth (and time those of ``config.timed``); returns one row
    per (variant, depth)."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    rows: list[BenchRow] = []
    batches = config.batches or (config.batch,)
    for batch in batches:
        case = "mlp" if len(batches) == 1 else f"mlp batch {batch}"
        for depth in config.depths:
            torch.manual_seed(config.seed)
            blocks = [b.to(device) for b in mlp_blocks(config.width, depth)]
            x = torch.randn(batch, config.width, device=device, requires_grad=True)
            variants = config.variants + config.timed
            builders = {
                v: functools.partial(variant_model, v, blocks, config.gamma) for v in variants
            }
            repeats = config.repeats if config.time_steps else 0
            results = measure(builders, (x,), repeats, device, config.timed)
            for v in variants:
                peak, accumulate = _true_peak(config, batch, depth, v)
                rows.append(
                    BenchRow(
                        v,
                        case,
                        depth,
                        *results[v],
                        true_peak_bytes=peak,
                        true_peak_accumulate_bytes=accumulate,
                    )
                )
            if progress is not None:
                progress(f"{case}, depth {depth}: done")
    return _with_ratios(rows)


def _true_peak(config: BenchConfig, batch: int, depth: int, variant: str) -> tuple[float, float]:
    """True peaks (.grad unset, accumulation) in a fresh process when ``config`` asks, else nan."""
    if not config.true_peak or variant in config.timed:
        return math.nan, math.nan
    case = PeakCase("mlp", depth, batch, config.width, gamma=config.gamma, seed=config.seed)
    found = true_peak(case, variant, device=config.device, threads=config.threads)
    if found.grad_unset.reason:
        raise InertiaError(f"no true peak on this machine: {found.grad_unset.reason}")
    return found.grad_unset.peak_bytes, found.grad_accumulated.peak_bytes


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


def write_csv(rows: Iterable[BenchRow], path: Path) -> None:
    """One line per `BenchRow`, its fields as columns."""
    write_rows(rows, BenchRow, path, ".4g")


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
            lambda r: (
                f"{r.peak_saved_bytes / 2**20:.2f} ({r.memory_ratio:.2f}x)"
                if math.isfinite(r.peak_saved_bytes)
                else "n/a"
            ),
        ),
        *(
            table(
                "True peak of a training step (MiB): .grad unset / gradient accumulation",
                lambda r: (
                    f"{r.true_peak_bytes / 2**20:.1f} / {r.true_peak_accumulate_bytes / 2**20:.1f}"
                    if math.isfinite(r.true_peak_bytes)
                    else "n/a"
                ),
            )
            if any(math.isfinite(r.true_peak_bytes) for r in rows)
            else []
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
    sizes = ", ".join(map(str, config.batches))
    batch = f"batches {sizes}" if config.batches else f"batch {config.batch}"
    floors = (
        f" Timed only: {', '.join(config.timed)} (the floors of a memory-free stack's step, "
        "`inertia.bench`)."
        if config.timed
        else ""
    )
    return (
        f"Blocks Linear({config.width})-GELU-Linear({config.width}), {batch}, "
        f"gamma {config.gamma}; time: median of {config.repeats} interleaved steps "
        f"[min-max], ratio to plain in parentheses.{floors}"
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


def _builders(
    model: nn.Module, paths: list[str], keep_first: bool, gamma: float
) -> dict[str, Callable[[bool], nn.Module]]:
    from ..transform import transform_to_momentumnet

    def momentum(exact: bool | None, checkpointed: bool, for_memory: bool) -> nn.Module:
        return transform_to_momentumnet(
            model,
            paths,
            keep_first_layer=keep_first,
            gamma=gamma,
            method="memory_free",
            checkpoint_kept=checkpointed,
            checkpoint_stem=checkpointed,
            exact=exact,
        )

    def default(for_memory: bool) -> nn.Module:
        return transform_to_momentumnet(model, paths, keep_first_layer=keep_first, gamma=gamma)

    builders: dict[str, Callable[[bool], nn.Module]] = {
        "plain": lambda for_memory: model,
        "checkpoint": functools.partial(checkpoint_every_block, model, paths),
        DEFAULT: default,
        "momentum_free": functools.partial(momentum, False, False),
        "momentum_exact": functools.partial(momentum, None, False),  # the default
    }
    if keep_first:
        builders[LEAN_RESNET[1]] = functools.partial(momentum, None, True)
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
        depth = sum(len(stack_at(model, p)) for p in paths)
        rows += [BenchRow(v, name, depth, *results[v]) for v in builders]
        if progress is not None:
            progress(f"{name}: done")
    return _with_ratios(rows)
