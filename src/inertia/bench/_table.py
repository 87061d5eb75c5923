"""The true-peak table: each case and variant measured by `true_peak`, timed by `time_variants`.

``benchmarks/true_peak.py`` writes it; `run_true_peak` is the one function behind it.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from ._fresh import time_variants, true_peak
from ._steps import DEFAULT, FLOOR, LEAN_RESNET, RECOMPUTE, PeakCase

#: The cases of ``benchmarks/true_peak.py``: parameters dominate, activations dominate, an encoder,
#: two ResNets.
DEFAULT_CASES = (
    PeakCase("mlp", depth=64, batch=256, width=512),
    PeakCase("mlp", depth=32, batch=4096, width=512),
    PeakCase("encoder", depth=12, batch=16, width=256, seq_len=512, heads=8),
    PeakCase("resnet50", batch=16, image_size=224),
    PeakCase("resnet101", batch=16, image_size=224),
)
#: The variants of the true-peak table (`LEAN_RESNET` on the ResNets only).
PEAK_VARIANTS = ("plain", "checkpoint", DEFAULT, "momentum_free", "momentum_exact", *LEAN_RESNET)


@dataclass(frozen=True)
class PeakConfig:
    """What `run_true_peak` measures.

    Args:
        cases: The models and their sizes.
        variants: Variants of each case (see `inertia.bench`), those that apply to it
            (`PeakCase.runs`); ``plain`` is the ratios' base.
        timed: Variants that are timed only, with the others (``checkpoint_whole`` and
            ``floor``: the memory-free stacks' floors, `RECOMPUTE` and `IntegerFloor`).
        repeats: Timed steps of each variant (the median is reported), interleaved in one process
            per case after a round that warms up; 0: no timing.
        threads: ``torch.set_num_threads`` in every process; None leaves torch's default.
        device: ``"cpu"`` or a CUDA device.
        optimizer: ``"sgd"`` or ``"adam"``: measure its step as well, reported apart.
        timeout: Seconds allowed to each process.

    Examples:
        >>> PeakConfig(cases=(PeakCase("mlp", depth=4),), repeats=0).variants[:2]
        ('plain', 'checkpoint')
    """

    cases: tuple[PeakCase, ...] = DEFAULT_CASES
    variants: tuple[str, ...] = PEAK_VARIANTS
    timed: tuple[str, ...] = (RECOMPUTE, FLOOR)
    repeats: int = 3
    threads: int | None = 2
    device: str = "cpu"
    optimizer: str | None = None
    timeout: float | None = None


@dataclass(frozen=True)
class PeakRow:
    """One variant of one case: true peaks, bytes saved for backward, step time.

    Peaks are bytes beyond what the process held just before the step; nan where they could not
    be read (``reason``). Ratios are against ``plain`` of the same case.

    Examples:
        >>> PeakRow("plain", "mlp", 2.0**20, 2.0**20, math.nan, 0, 0, 1.0).step_ms
        1.0
    """

    variant: str
    case: str
    peak_bytes: float  # .grad unset before the step
    accumulate_peak_bytes: float  # .grad allocated before the step
    optimizer_peak_bytes: float  # the optimizer's step alone; nan when not measured
    saved_bytes: float  # peak bytes saved for backward, parameters excluded; nan: timed only
    parameter_bytes: int
    step_ms: float  # median step time; nan when not timed
    stack_saved_bytes: float = math.nan  # the stack's, held after the forward; nan: no stack
    gradient_bytes: int = 0  # the trainable parameters' .grad (those of the accumulation step)
    logits_bytes: int = 0  # the float32 logits the loss computes at once; 0: no logits
    time_ratio: float = math.nan  # step_ms / plain's
    memory_ratio: float = math.nan  # peak_bytes / plain's
    reason: str = ""  # why the peaks are nan
    warnings: str = ""  # what the measuring process warned, "; "-separated


def run_true_peak(
    config: PeakConfig, progress: Callable[[str], None] | None = None
) -> list[PeakRow]:
    """Every case and variant of ``config``: one fresh process each for memory, one per case for
    time.

    Examples:
        >>> config = PeakConfig(
        ...     cases=(PeakCase("mlp", depth=2, batch=4, width=8),), variants=("plain",), repeats=0
        ... )
        >>> [(row.variant, row.parameter_bytes) for row in run_true_peak(config)]
        [('plain', 1152)]
    """
    rows = []
    for case in config.cases:
        found = {}
        variants = tuple(v for v in config.variants if case.runs(v))
        for variant in variants:
            found[variant] = true_peak(
                case,
                variant,
                device=config.device,
                optimizer=config.optimizer,
                threads=config.threads,
                timeout=config.timeout,
            )
            if progress is not None:
                progress(f"{case.label()}, {variant}: memory measured")
        times = {}
        if config.repeats:
            times = time_variants(
                case,
                variants + config.timed,
                config.repeats,
                device=config.device,
                threads=config.threads,
                timeout=config.timeout,
            )
            if progress is not None:
                progress(f"{case.label()}: timed")
        case_rows = []
        for variant, r in found.items():
            opt = r.optimizer_step
            t = sorted(times.get(variant, []))
            case_rows.append(
                PeakRow(
                    variant=variant,
                    case=r.case,
                    peak_bytes=r.grad_unset.peak_bytes,
                    accumulate_peak_bytes=r.grad_accumulated.peak_bytes,
                    optimizer_peak_bytes=math.nan if opt is None else opt.peak_bytes,
                    saved_bytes=r.saved_bytes,
                    parameter_bytes=r.parameter_bytes,
                    step_ms=_median(t),
                    stack_saved_bytes=math.nan
                    if r.stack_saved_bytes is None
                    else float(r.stack_saved_bytes),
                    gradient_bytes=r.grad_accumulated.grad_bytes,
                    logits_bytes=r.logits_bytes,
                    reason=r.grad_unset.reason,
                    warnings="; ".join(r.warnings),
                )
            )
        if times and case_rows:
            nan = math.nan
            parameters = case_rows[0].parameter_bytes  # the same model, run otherwise
            for variant in config.timed:
                step = _median(sorted(times[variant]))
                row = PeakRow(variant, case_rows[0].case, nan, nan, nan, nan, parameters, step)
                case_rows.append(row)
        rows += _ratios(case_rows)
    return rows


def _median(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _ratios(rows: list[PeakRow]) -> list[PeakRow]:
    base = next((r for r in rows if r.variant == "plain"), None)
    if base is None:
        return rows
    return [
        replace(
            r,
            time_ratio=_ratio(r.step_ms, base.step_ms),
            memory_ratio=_ratio(r.peak_bytes, base.peak_bytes),
        )
        for r in rows
    ]


def _ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(b) else math.nan


def write_peak_csv(rows: Iterable[PeakRow], path: Path) -> None:
    """One line per `PeakRow`, its fields as columns."""
    write_rows(rows, PeakRow, path, ".6g")


def write_rows(rows: Iterable[object], row_type: type, path: Path, fmt: str) -> None:
    """One line per dataclass row, the fields of ``row_type`` as columns, floats in ``fmt``."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([f.name for f in fields(row_type)])
        for r in rows:
            values = asdict(r).values()  # type: ignore[call-overload]
            writer.writerow([format(v, fmt) if isinstance(v, float) else v for v in values])


def write_dict_rows(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """One line per dict row, the first row's keys as columns (the benchmark scripts' CSVs)."""
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def machine(config: PeakConfig) -> str:
    """The machine, torch's version and the threads, in one line."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [x for x in cpuinfo.read_text().splitlines() if x.startswith("model name")]
        cpu = names[0].partition(":")[2].strip() if names else cpu
    where = f"{cpu}, {os.cpu_count()} cores"
    if config.device.startswith("cuda") and torch.cuda.is_available():
        where = f"{torch.cuda.get_device_name(torch.device(config.device))}, {where}"
    threads = f"{config.threads} thread(s)" if config.threads else "torch's default threads"
    return f"{where}; torch {torch.__version__}; {threads} per process"


def write_peak_markdown(
    rows: Sequence[PeakRow], path: Path, command: str, config: PeakConfig, description: str = ""
) -> None:
    """The table (one line per case and variant), the command, the machine and the notes."""

    def mib(x: float, ratio: float = math.nan) -> str:
        if not math.isfinite(x):
            return "n/a"
        return f"{x / 2**20:,.1f}" + (f" ({ratio:.2f}x)" if math.isfinite(ratio) else "")

    optimizer = any(math.isfinite(r.optimizer_peak_bytes) for r in rows)
    head = ["case", "variant", "true peak, .grad unset (MiB)", "true peak, accumulation (MiB)"]
    head += [f"{config.optimizer} step (MiB)"] * optimizer
    head += ["saved for backward (MiB)"]
    stacks = any(math.isfinite(r.stack_saved_bytes) for r in rows)
    head += ["stack's saved, after forward (MiB)"] * stacks
    head += ["parameters (MiB)", "step (ms)", "time / plain"]
    base = {r.case: r.stack_saved_bytes for r in rows if r.variant == "checkpoint"}
    lines = [
        f"Produced by `{command}` ({machine(config)}).",
        "",
        *([description, ""] if description else []),
        "| " + " | ".join(head) + " |",
        "|---" * len(head) + "|",
    ]
    for r in rows:
        cells = [r.case, r.variant, mib(r.peak_bytes, r.memory_ratio), mib(r.accumulate_peak_bytes)]
        cells += [mib(r.optimizer_peak_bytes)] * optimizer
        step = f"{r.step_ms:,.0f}" if math.isfinite(r.step_ms) else "n/a"
        ratio = f"{r.time_ratio:.2f}x" if math.isfinite(r.time_ratio) else "n/a"
        cells += [mib(r.saved_bytes)]
        stack_ratio = r.stack_saved_bytes / base.get(r.case, math.nan)
        against = f" ({stack_ratio:.2f}x checkpoint's)" if math.isfinite(stack_ratio) else ""
        cells += [mib(r.stack_saved_bytes) + against] * stacks
        cells += [mib(r.parameter_bytes), step, ratio]
        lines.append("| " + " | ".join(cells) + " |")
    notes = dict.fromkeys(f"{r.case}, {r.variant}: {r.reason}" for r in rows if r.reason)
    notes.update(dict.fromkeys(f"{r.case}, {r.variant}: {r.warnings}" for r in rows if r.warnings))
    if notes:
        lines += ["", "Notes:", "", *(f"- {n}" for n in notes)]
    path.write_text("\n".join(lines) + "\n")


def command_line(script: str, argv: Sequence[str]) -> str:
    """The command that ran ``script`` with flags ``argv``, without ``--out`` and its value (where
    the results were written is not how they were measured)."""
    flags = list(argv)
    if "--out" in flags:
        i = flags.index("--out")
        del flags[i : i + 2]
    return shlex.join(["python", script, *flags])


def report_true_peak(
    config: PeakConfig,
    out: Path,
    stem: str,
    script: str,
    argv: Sequence[str],
    describe: Callable[[PeakConfig], str],
) -> str:
    """Run `run_true_peak` with progress on stderr, write ``out/stem.{csv,md}`` and return the
    markdown: what a ``benchmarks/`` script of the true-peak kind does after parsing its flags.

    Args:
        config: What to measure.
        out: The folder of the results (created if missing).
        stem: The files' name without suffix.
        script: The script's path from the repository root, for the command in the table.
        argv: The script's flags (`command_line`).
        describe: The table's description of ``config``; the run's duration is appended.
    """
    start = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - start:5.0f} s] {message}", file=sys.stderr, flush=True)

    rows = run_true_peak(config, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    write_peak_csv(rows, out / f"{stem}.csv")
    command = command_line(script, argv)
    minutes = (time.perf_counter() - start) / 60
    description = describe(config) + f" The whole run took {minutes:.1f} minutes."
    write_peak_markdown(rows, out / f"{stem}.md", command, config, description)
    return (out / f"{stem}.md").read_text()
