"""Figures from result files: learning curves of a training run, and benchmark CSVs.

Needs matplotlib (``pip install 'inertia[plot]'``), imported only when a figure is drawn. Figures
are drawn on their own Agg canvas, never through ``pyplot``: the caller's backend and open figures
are left alone. Each figure is written as PNG and PDF side by side.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._errors import InertiaError
from .bench import FLOOR, LEAN_RESNET, PAPER, RECOMPUTE, VARIANTS, BenchRow

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_bench", "plot_training"]

_MIB = 2**20
_LABELS = {
    "plain": "plain",
    "checkpoint": "checkpoint every block",
    "momentum_backprop": "momentum, backprop",
    "momentum_free": "momentum, memory-free, float",
    "momentum_exact": "momentum, memory-free, exact",
    LEAN_RESNET[0]: "memory-free, float + checkpointed stem, first blocks",
    LEAN_RESNET[1]: "memory-free, exact + checkpointed stem, first blocks",
    PAPER: "momentumnet 0.10 (the paper's package)",
    RECOMPUTE: "checkpoint, blocks recomputed whole (memory-free's floor)",
    FLOOR: "checkpoint, recomputed whole + the integer update (exact's floor)",
}
_MARKERS = "osD^vP*X"
_METRICS = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy")
_CAST: dict[str, Callable[[str], Any]] = {"str": str, "int": int, "float": float}


def _figure(panels: int) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise InertiaError("plotting needs matplotlib: pip install 'inertia[plot]'") from e
    fig = Figure(figsize=(5.2 * panels, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1], metadata={"CreationDate": None})  # same data, same bytes: no git churn
    return paths


def plot_training(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    r"""Learning curves of a training run: loss and accuracy against epoch, train and held-out.

    Args:
        run_dir: Folder written by ``inertia train --out DIR``: ``metrics.csv`` (one row per
            epoch: ``epoch,train_loss,train_accuracy,test_loss,test_accuracy,seconds,
            samples_per_second``) and optionally ``config.json``, whose ``model``, ``gamma`` and
            ``memory_free`` entries go into the title. Accuracies at most 1 are read as fractions
            and shown in percent.
        out_dir: Where to write the figures; defaults to ``run_dir``.

    Returns:
        The paths written: ``learning_curves.png`` and ``learning_curves.pdf``.

    Raises:
        InertiaError: ``metrics.csv`` is missing, has no rows or lacks a column; or matplotlib
            is not installed.

    Examples:
        >>> import tempfile
        >>> header = "epoch,train_loss,train_accuracy,test_loss,test_accuracy"
        >>> with tempfile.TemporaryDirectory() as run_dir:
        ...     _ = Path(run_dir, "metrics.csv").write_text(f"{header}\n1,2.3,0.11,2.4,0.1\n")
        ...     [path.name for path in plot_training(run_dir)]
        ['learning_curves.png', 'learning_curves.pdf']
    """
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.csv"
    if not metrics.is_file():
        raise InertiaError(f"no {metrics}: run `inertia train --out {run_dir}` first")
    with metrics.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or any(k not in rows[0] for k in _METRICS):
        raise InertiaError(f"{metrics} needs the columns {', '.join(_METRICS)} and a row per epoch")
    col = {k: [float(r[k]) if r[k] else math.nan for r in rows] for k in _METRICS}
    acc = [a for k in ("train_accuracy", "test_accuracy") for a in col[k] if math.isfinite(a)]
    scale = {"loss": 1.0, "accuracy": 100.0 if acc and max(acc) <= 1 else 1.0}
    fig = _figure(2)
    for ax, key in zip(fig.subplots(1, 2), scale, strict=True):
        for split, label in (("train", "train"), ("test", "held-out")):
            ys = [scale[key] * y for y in col[f"{split}_{key}"]]
            ax.plot(col["epoch"], ys, marker="o" if len(rows) <= 30 else "", label=label)
        ylabel = "accuracy (%)" if key == "accuracy" else "loss (mean per sample)"
        ax.set(xlabel="epoch", ylabel=ylabel, title=key)
        ax.xaxis.get_major_locator().set_params(integer=True, min_n_ticks=1)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Learning curves: {_run_title(run_dir)}")
    return _save(fig, Path(out_dir) if out_dir is not None else run_dir, "learning_curves")


def _run_title(run_dir: Path) -> str:
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config = config if isinstance(config, dict) else {}
    parts = [str(config.get("model", run_dir.name))]
    if "gamma" in config:
        parts.append(f"γ = {config['gamma']}")
    if "memory_free" in config:
        parts.append("memory-free backward" if config["memory_free"] else "backprop")
    return ", ".join(parts)


def plot_bench(csv_path: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Memory and time of a benchmark CSV written by `inertia.bench.write_csv`.

    A depth sweep (case ``mlp``) gives two panels against depth, one line per variant: peak bytes
    saved for backward (MiB, log scale) and step time as a ratio to ``plain``. Model rows give
    the same two quantities as bars grouped by model. A file holding both gives both figures.

    Args:
        csv_path: The benchmark CSV, e.g. ``benchmarks/results/memory_vs_depth.csv``.
        out_dir: Where to write the figures; defaults to the CSV's folder.

    Returns:
        The paths written: ``<stem>.png`` and ``<stem>.pdf``, where ``<stem>`` is the CSV's stem,
        or ``<stem>_depth.*`` and ``<stem>_models.*`` when the file holds both kinds of rows.

    Raises:
        InertiaError: The file is missing, empty, or lacks a column of `inertia.bench.BenchRow`;
            or matplotlib is not installed.

    Examples:
        >>> import tempfile
        >>> from inertia import bench
        >>> config = bench.BenchConfig(
        ...     depths=(2, 4), width=8, batch=4, threads=None, time_steps=False
        ... )
        >>> with tempfile.TemporaryDirectory() as out:
        ...     bench.write_csv(bench.run(config), Path(out, "sweep.csv"))
        ...     [path.name for path in plot_bench(Path(out, "sweep.csv"))]
        ['sweep.png', 'sweep.pdf']
    """
    csv_path = Path(csv_path)
    rows = _read_bench(csv_path)
    out = Path(out_dir) if out_dir is not None else csv_path.parent
    sweeps: dict[str, list[BenchRow]] = {}
    for r in rows:
        if r.case.startswith("mlp"):  # "mlp", or "mlp batch B" in a sweep over batch sizes too
            sweeps.setdefault(r.case, []).append(r)
    models = [r for r in rows if not r.case.startswith("mlp")]
    paths: list[Path] = []
    for case, sweep in sweeps.items():
        suffix = "_depth" if models and len(sweeps) == 1 else ""
        if len(sweeps) > 1:
            suffix = "_" + case.removeprefix("mlp ").replace(" ", "")
        paths += _save(_bench_figure(sweep, True), out, csv_path.stem + suffix)
    both = bool(sweeps) and bool(models)
    if models:
        paths += _save(_bench_figure(models, False), out, csv_path.stem + ("_models" * both))
    return paths


def _read_bench(path: Path) -> list[BenchRow]:
    if not path.is_file():
        raise InertiaError(f"no {path}: write it with inertia.bench.write_csv (benchmarks/*.py)")
    with path.open(newline="") as fh:
        records = list(csv.DictReader(fh))
    if not records:
        raise InertiaError(f"{path} has no benchmark rows")
    required = [f.name for f in fields(BenchRow) if f.default is MISSING]
    missing = [name for name in required if name not in records[0]]
    if missing:
        raise InertiaError(f"{path} is not a benchmark CSV: no column {', '.join(missing)}")
    present = [f for f in fields(BenchRow) if f.name in records[0]]  # older files lack some
    return [BenchRow(**{f.name: _CAST[str(f.type)](r[f.name]) for f in present}) for r in records]


def _bench_figure(rows: Sequence[BenchRow], sweep: bool) -> Figure:
    """Peak MiB and time ratio: against depth (lines) for a sweep, else bars grouped by model."""
    seen = list(dict.fromkeys(r.variant for r in rows))
    palette = [*VARIANTS, *(v for v in _LABELS if v not in VARIANTS)]
    palette += [v for v in seen if v not in palette]  # a variant keeps its colour in every figure
    variants = [v for v in palette if v in seen]
    cases = list(dict.fromkeys((r.case, r.depth) for r in rows))
    cases.sort(key=lambda c: c[1] if sweep else 0)
    cell = {(r.variant, r.case, r.depth): r for r in rows}
    fig = _figure(2)
    axes = fig.subplots(1, 2, sharex=True)
    timed = any(math.isfinite(r.time_ratio) for r in rows)
    quantities: list[tuple[Callable[[BenchRow], float], str]] = [
        (lambda r: r.peak_saved_bytes / _MIB, "%.0f"),
        (lambda r: r.time_ratio, "%.2f"),
    ]
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        own = [(j, cell[v, c, d]) for j, (c, d) in enumerate(cases) if (v, c, d) in cell]
        style: dict[str, Any] = {"label": _LABELS.get(v, v), "color": f"C{palette.index(v) % 10}"}
        for ax, (y, fmt) in zip(axes[: 1 + timed], quantities[: 1 + timed], strict=True):
            ys = [y(r) for _, r in own]
            if sweep:  # equal curves (plain, backprop) stay visible: later ones dashed, smaller
                ls = ("-", "--", "-.", ":")[i % 4]
                mark = {"marker": _MARKERS[i % len(_MARKERS)], "markersize": max(8 - 1.2 * i, 4)}
                ax.plot([r.depth for _, r in own], ys, linestyle=ls, **mark, **style)
            else:
                xs = [j + (i - (len(variants) - 1) / 2) * width for j, _ in own]
                ax.bar_label(ax.bar(xs, ys, width, **style), fmt=fmt, fontsize=7)
    mem, time = axes
    if sweep:  # log depth ticked at the measured depths; MiB labelled 1, 2, 5 times powers of 10
        from matplotlib.ticker import LogLocator, NullFormatter

        mem.set(xscale="log", xticks=[d for _, d in cases], xticklabels=[d for _, d in cases])
        mem.minorticks_off()
        mem.set_yscale("log")
        mem.yaxis.set(major_locator=LogLocator(subs=(1.0, 2.0, 5.0)), major_formatter="{x:g}")
        mem.yaxis.set_minor_formatter(NullFormatter())
    else:
        mem.set_xticks(range(len(cases)), [f"{c}\n({d} blocks)" for c, d in cases])
    for ax in axes:
        ax.grid(alpha=0.3, axis="both" if sweep else "y")
        if sweep:
            ax.set_xlabel("depth (residual blocks)")
        else:
            ax.margins(y=0.12)
    mem.set(ylabel="peak bytes saved for backward (MiB)", title="memory")
    time.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    time.set(ylabel="training step time / plain (×)", title="time" if timed else "time: not timed")
    handles, labels = axes[0].get_legend_handles_labels()
    ncols = len(labels) if sum(map(len, labels)) <= 100 else 3  # longer rows fall off the figure
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols, frameon=False)
    what = "Residual MLP stack, against depth" if sweep else "Converted models"
    fig.suptitle(f"{what}: memory saved for backward and training step time")
    return fig
