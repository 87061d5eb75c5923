"""The ``inertia`` command: ``train``, ``bench``, ``plot`` and ``experiment``, thin layers over
library functions.

Each command parses its flags into a config dataclass, calls one function, prints one summary line
and writes machine-readable results to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path

from ._errors import InertiaError

__all__ = ["main", "parser"]


def _train_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .plan import PLAN_METHODS
    from .training import TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="train a registered model (saving memory by default)")
    p.add_argument("--model", default=d.model, help="a registered model (see --list-models)")
    p.add_argument("--list-models", action="store_true", help="print the registered models")
    p.add_argument("--dataset", default=d.dataset,
                   help="digits (embedded), synthetic, fashion-mnist, cifar10, cifar100 or "
                   "imagefolder")  # fmt: skip
    p.add_argument("--data-dir", default=None, help="folder of a dataset in torchvision's format")
    p.add_argument("--gamma", type=float, default=d.gamma)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--memory-free", dest="memory_free", action="store_true", default=True,
                      help="save memory, each stage as --method says (default)")  # fmt: skip
    mode.add_argument("--backprop", dest="memory_free", action="store_false",
                      help="ordinary backpropagation")  # fmt: skip
    p.add_argument("--method", choices=PLAN_METHODS, default=d.method,
                   help="how each stage saves memory: auto (default) chooses by the bytes each "
                   "method keeps (memory-free for stages of three blocks and more)")  # fmt: skip
    p.add_argument("--checkpoint-kept", action="store_const", const=True, default=None,
                   help="checkpoint the first block of each ResNet stage (default: when "
                   "saving memory)")  # fmt: skip
    p.add_argument("--checkpoint-stem", action="store_const", const=True, default=None,
                   help="checkpoint the ResNet stem (default: when saving memory)")  # fmt: skip
    arith = p.add_mutually_exclusive_group()
    arith.add_argument("--exact", dest="exact", action="store_const", const=True, default=None,
                       help="fixed-point momentum, whose memory-free backward rebuilds every "
                       "activation bit for bit (the default when memory-free)")  # fmt: skip
    arith.add_argument("--float", dest="exact", action="store_const", const=False,
                       help="float momentum: faster, but its memory-free gradients drift with "
                       "depth")  # fmt: skip
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast dtype")
    p.add_argument("--device", default=d.device, help="auto (cuda if available), cpu, cuda:0...")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out, help="folder for metrics, config and checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    p.add_argument("--no-progress", dest="progress", action="store_false")


class UsageError(InertiaError):
    """A bad flag: ``inertia`` prints it on one line and exits with status 2, as argparse does."""


def _check_train(args: argparse.Namespace) -> None:
    from .data import DATASETS
    from .models import list_models

    if args.model not in list_models():
        raise UsageError(
            f"--model {args.model!r} is not a registered model; choose one of "
            f"{', '.join(list_models())} (inertia train --list-models)."
        )
    if args.dataset not in DATASETS:
        raise UsageError(f"--dataset {args.dataset!r}: choose one of {', '.join(DATASETS)}.")
    if not 0 <= args.gamma <= 1:  # NaN too
        raise UsageError(
            f"--gamma {args.gamma}: the momentum must be in [0, 1] (the paper uses 0.9)."
        )
    if args.epochs < 0:
        raise UsageError(f"--epochs {args.epochs}: it must be 0 or more.")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: it must be 1 or more.")


def _train(args: argparse.Namespace) -> int:
    from .models import list_models
    from .training import TrainConfig, fit

    if args.list_models:
        print("\n".join(list_models()))
        return 0
    _check_train(args)
    names = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    result = fit(config)
    if not result.is_main:
        return 130 if result.interrupted else 0  # rank 0 reports for the whole torchrun job
    acc = f"held-out accuracy {result.test_accuracy:.1%}" if result.metrics else "no epoch done"
    if result.peak_cuda_bytes is not None:
        memory = f"peak CUDA memory {result.peak_cuda_bytes / 2**20:,.0f} MiB"
    else:
        peaks = result.step_bytes
        this = peaks["this run"]
        grads = result.gradient_bytes / 2**20
        memory = (
            f"one step holds {this / 2**20:,.2f} MiB ({grads:,.2f} of gradients): "
            + ", ".join(
                f"{this / other:.2f}x {name}'s {other / 2**20:,.2f}"
                for name, other in peaks.items()
                if name != "this run"
            )
        )
    state = "interrupted, checkpoint kept; continue with --resume" if result.interrupted else "done"
    print(
        f"inertia train: {config.model} on {config.dataset}, {len(result.metrics)}/"
        f"{config.epochs} epochs, {acc} | {memory} | {state} | {result.out}"
    )
    return 130 if result.interrupted else 0


def _bench_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bench", help="memory and time against depth, side by side")
    p.add_argument("--quick", action="store_true", help="small sizes: about a minute on a CPU")
    p.add_argument("--depths", type=int, nargs="+", default=None)
    p.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes to sweep")
    p.add_argument("--variants", nargs="+", default=None,
                   help="variants to measure (plain and momentum_free at least)")  # fmt: skip
    p.add_argument("--true-peak", action="store_true",
                   help="also the true peak of each step (resident memory on a CPU, each variant "
                   "and depth in a fresh process)")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/bench")


def _bench(args: argparse.Namespace) -> int:
    from .bench import (
        FLOOR,
        PAPER,
        RECOMPUTE,
        BenchConfig,
        describe,
        run,
        write_csv,
        write_markdown,
    )
    from .plots import plot_bench

    # Timed beside the default variants: the least time of any memory-free stack, and of an
    # exact one (not where --variants names what to run).
    floors = () if args.variants else (RECOMPUTE, FLOOR)
    config = BenchConfig(device=args.device, timed=floors)
    if args.quick:
        config = dataclasses.replace(config, depths=(4, 16, 64), width=512, batch=256, repeats=3)
    for flag, values in (("--depths", args.depths), ("--batches", args.batches)):
        if values and min(values) < 1:
            raise UsageError(f"{flag} {' '.join(map(str, values))}: each must be 1 or more.")
    if args.depths:
        config = dataclasses.replace(config, depths=tuple(args.depths))
    if args.batches:
        config = dataclasses.replace(config, batches=tuple(args.batches))
    if args.variants:
        if not {"plain", "momentum_free"} <= set(args.variants):
            raise UsageError("--variants: the summary compares momentum_free with plain; name both")
        config = dataclasses.replace(config, variants=tuple(args.variants))
    config = dataclasses.replace(config, true_peak=args.true_peak)
    rows = run(config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "bench.csv")
    write_markdown(rows, out / "bench.md", _bench_command(args), describe(config))
    plots = _try_plots(lambda: plot_bench(out / "bench.csv"))
    deepest = max(config.depths)
    cell = {r.variant: r for r in rows if r.depth == deepest}  # the last batch size
    names = {"momentum_exact": "inertia exact (the default)", "momentum_free": "inertia float",
             "checkpoint": "checkpointing", PAPER: "momentumnet 0.10"}  # fmt: skip
    parts = []
    for variant, name in names.items():
        if variant in cell:
            r = cell[variant]
            peak = f", true peak {r.true_peak_bytes / 2**20:.1f}" if config.true_peak else ""
            parts.append(
                f"{name} {r.peak_saved_bytes / 2**20:.2f} MiB saved{peak}, {r.time_ratio:.2f}x"
            )
    floor = ", ".join(
        f"{label} {cell[v].time_ratio:.2f}x"
        for v, label in ((RECOMPUTE, "any memory-free stack"), (FLOOR, "exact"))
        if v in cell
    )
    plain = cell["plain"]
    base = f"plain {plain.peak_saved_bytes / 2**20:.2f} MiB saved" + (
        f", true peak {plain.true_peak_bytes / 2**20:.1f}" if config.true_peak else ""
    )
    print(
        f"inertia bench: {plain.case}, depth {deepest}, against {base} (MiB; steps as "
        f"multiples of plain's): {'; '.join(parts)}"
        f"{'; floors of the step: ' + floor if floor else ''} | "
        f"{out / 'bench.md'}{plots}"
    )
    return 0


def _bench_command(args: argparse.Namespace) -> str:
    """The command line that reproduces a bench run's table (its ``--out`` aside)."""
    words = ["inertia", "bench", *(["--quick"] if args.quick else [])]
    for flag, values in (("--depths", args.depths), ("--batches", args.batches),
                         ("--variants", args.variants)):  # fmt: skip
        words += [flag, *map(str, values)] if values else []
    words += ["--true-peak"] if args.true_peak else []
    words += ["--device", args.device] if args.device != "cpu" else []
    return shlex.join(words)


def _try_plots(make: Callable[[], list[Path]]) -> str:
    """Plots when matplotlib is installed (the ``plot`` extra); a note otherwise."""
    try:
        paths = make()
    except InertiaError as err:
        return f" | no plots: {err}"
    return " | plots: " + ", ".join(str(p) for p in paths if str(p).endswith(".png"))


def _plot_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("plot", help="plot a training run folder or a bench CSV")
    p.add_argument("path", help="a folder written by 'inertia train', or a CSV by 'inertia bench'")
    p.add_argument("--out", default=None, help="folder for the figures (default: beside the data)")


def _plot(args: argparse.Namespace) -> int:
    from .plots import plot_bench, plot_training

    path = Path(args.path)
    paths = plot_bench(path, args.out) if path.suffix == ".csv" else plot_training(path, args.out)
    print("inertia plot: " + ", ".join(str(p) for p in paths))
    return 0


def _experiment_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .experiments import ExperimentConfig

    d = ExperimentConfig()
    p = sub.add_parser("experiment", help="reproduce one of the paper's experiments at small scale")
    p.add_argument("name", nargs="?", help="the experiment (see --list)")
    p.add_argument("--list", action="store_true", help="print the experiments and exit")
    p.add_argument("--out", default="runs/experiments", help="folder for NAME.png, .csv and .md")
    p.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds))
    p.add_argument("--quick", action="store_true", help="small sizes: seconds, as in the tests")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads while it runs")
    p.add_argument("--true-peak", action="store_true",
                   help="memory: the true peak of each step too (first seed)")  # fmt: skip
    p.add_argument("--data-dir", default=None,
                   help="Fashion-MNIST's IDX files (default: Debian's folder)")  # fmt: skip
    p.add_argument("--part", nargs="+", default=[],
                   help="run only these parts of an experiment made of parts (llm: sweep, "
                   "finetune); default: all")  # fmt: skip


def _experiment(args: argparse.Namespace) -> int:
    from .bench import environment
    from .experiments import EXPERIMENTS, ExperimentConfig, run_experiment, write_results
    from .experiments._core import threads

    if args.list:
        width = max(map(len, EXPERIMENTS))
        print("\n".join(f"{n:<{width}}  {e.title}" for n, e in EXPERIMENTS.items()))
        return 0
    if args.name is None:
        raise UsageError("name an experiment, or pass --list to see them")
    if args.name not in EXPERIMENTS:
        raise UsageError(
            f"unknown experiment {args.name!r}; choose one of {', '.join(EXPERIMENTS)}"
        )
    try:
        EXPERIMENTS[args.name].check_parts(args.part)
    except ValueError as err:
        raise UsageError(f"--part {' '.join(args.part)}: {err}.") from None
    config = ExperimentConfig(
        seeds=tuple(args.seeds),
        quick=args.quick,
        threads=args.threads,
        data_dir=args.data_dir,
        true_peak=args.true_peak,
        parts=tuple(args.part),
    )
    result = run_experiment(args.name, config)
    words = ["inertia experiment", args.name, *(["--quick"] if args.quick else [])]
    words += ["--true-peak"] if args.true_peak else []
    words += ["--part", *args.part] if args.part else []
    if config.seeds != ExperimentConfig().seeds:
        words += ["--seeds", *map(str, config.seeds)]
    command = " ".join([*words, "--out", args.out])
    with threads(config.threads):  # the thread count it ran with
        env = environment()
    paths = write_results(result, args.out, command, env)
    verdict = "claim holds" if result.holds else "claim does NOT hold"
    files = ", ".join(str(p) for p in paths if p.suffix in (".md", ".png"))
    print(f"inertia experiment {args.name}: {verdict}: {result.summary} | "
          f"{result.seconds:.0f} s | {files}")  # fmt: skip
    return 0 if result.holds else 1


def parser() -> argparse.ArgumentParser:
    """The parser of ``inertia``; the documentation's tests check its pages' commands with it."""
    parser = argparse.ArgumentParser(
        prog="inertia",
        description="Momentum residual networks: train, benchmark, plot, reproduce experiments.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _bench_parser(sub)
    _plot_parser(sub)
    _experiment_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``inertia`` and ``python -m inertia``; returns the exit status."""
    args = parser().parse_args(argv)
    commands = {"train": _train, "bench": _bench, "plot": _plot, "experiment": _experiment}
    command = commands[args.command]
    try:
        return command(args)
    except InertiaError as err:
        print(f"inertia {args.command}: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1
