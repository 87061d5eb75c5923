"""What every experiment shares: its config, its result, the registry, the writers, small modules.

An experiment is a function ``run(config) -> ExperimentResult`` and a function that draws its
figure from the result. Results hold the claim, the check applied (with its margin), whether it
held, one row per seed (the CSV and the markdown table), and the arrays the figure needs.
"""

from __future__ import annotations

import contextlib
import csv
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..nn import MomentumNet

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "EXPERIMENTS",
    "Experiment",
    "ExperimentConfig",
    "ExperimentResult",
    "Scaled",
    "register",
    "states",
    "tied_net",
    "write_results",
]


@dataclass(frozen=True)
class ExperimentConfig:
    """How to run an experiment.

    Args:
        seeds: One run per seed; the arms of a comparison share each seed's initial weights and
            data, so that they differ only in gamma. Claims are checked on every seed.
        quick: Small sizes (seconds, for tests and a first look) instead of the documented ones.
        threads: ``torch.set_num_threads`` while the experiment runs (restored after); None
            leaves it.
        data_dir: Folder of the Fashion-MNIST IDX files (experiment ``gamma``); default: Debian's
            ``/usr/share/datasets/fashion-mnist``.
        true_peak: Experiment ``memory``: also the true peak of each training step
            (`inertia.bench.true_peak`, a fresh process per depth and variant, first seed only).
        parts: For an experiment made of parts that can run apart (`Experiment.parts`; ``llm``:
            ``"sweep"`` and ``"finetune"``), the ones to run; empty (the default): all of them.
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    quick: bool = False
    threads: int | None = 1
    data_dir: str | None = None
    true_peak: bool = False
    parts: tuple[str, ...] = ()


@dataclass
class ExperimentResult:
    """What an experiment measured, and whether the paper's claim held on every seed.

    ``rows`` are the table: one tuple per seed (or per seed and arm) matching ``columns``.
    ``data`` holds the arrays the figure is drawn from; it is not written to disk.
    """

    name: str
    claim: str  # the paper's claim, as reproduced here
    check: str  # the test applied in code, with its margin
    holds: bool
    summary: str  # the measured margin, one line
    setup: str  # sizes, optimizer, what each arm is
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    data: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = math.nan


@dataclass(frozen=True)
class Experiment:
    """A registered experiment: ``run`` measures, ``plot`` draws the result on a figure;
    ``parts``, where it has any, name what `ExperimentConfig.parts` may select."""

    name: str
    title: str
    run: Callable[[ExperimentConfig], ExperimentResult]
    plot: Callable[[ExperimentResult, Figure], None]
    panels: int = 2
    parts: tuple[str, ...] = ()

    def check_parts(self, parts: Sequence[str]) -> None:
        """Raise ValueError unless every one of ``parts`` is one of this experiment's."""
        unknown = [p for p in parts if p not in self.parts]
        if not unknown:
            return
        if not self.parts:
            raise ValueError(f"experiment {self.name!r} has no parts to choose; it runs whole")
        raise ValueError(
            f"experiment {self.name!r} has no part {unknown[0]!r}; choose from "
            f"{', '.join(self.parts)}"
        )


#: Registered experiments by name, in the paper's order.
EXPERIMENTS: dict[str, Experiment] = {}


def register(
    name: str,
    title: str,
    plot: Callable[[ExperimentResult, Figure], None],
    panels: int = 2,
    parts: tuple[str, ...] = (),
) -> Callable[
    [Callable[[ExperimentConfig], ExperimentResult]], Callable[[ExperimentConfig], ExperimentResult]
]:
    """Decorator adding ``run`` to `EXPERIMENTS` under ``name``."""

    def add(
        run: Callable[[ExperimentConfig], ExperimentResult],
    ) -> Callable[[ExperimentConfig], ExperimentResult]:
        if name in EXPERIMENTS:
            raise ValueError(f"experiment {name!r} is already registered")
        EXPERIMENTS[name] = Experiment(name, title, run, plot, panels, parts)
        return run

    return add


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block, the previous count after it."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Scaled(nn.Module):
    """``scale * f(x, *args)``: a block whose output is scaled, e.g. by the step ``h``."""

    def __init__(self, f: nn.Module, scale: float) -> None:
        super().__init__()
        self.f, self.scale = f, scale

    def forward(self, x: Tensor, *args: Any) -> Tensor:
        return self.scale * self.f(x, *args)  # type: ignore[no-any-return]

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}"


def tied_net(block: nn.Module, depth: int, gamma: float, **kwargs: Any) -> MomentumNet:
    """``depth`` copies of one block (tied weights) in a `MomentumNet`.

    Memory-free backward for ``gamma > 0``; ``gamma = 0`` (the plain ResNet ``x + f(x)``) trains
    with backprop, since the memory-free inversion divides by gamma.
    """
    return MomentumNet([block] * depth, gamma, use_backprop=gamma == 0, **kwargs)


def states(net: MomentumNet, x: Tensor, *args: Any) -> Tensor:
    """``x_0, ..., x_N`` of a forward pass, stacked on a new first dimension (no autograd).

    The inputs of the blocks are recorded with forward pre-hooks, in call order; tied blocks are
    hooked once.
    """
    seen: list[Tensor] = []

    def record(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        seen.append(inputs[0].detach().clone())

    unique = list({id(b): b for b in net}.values())
    handles = [b.register_forward_pre_hook(record) for b in unique]
    try:
        with torch.no_grad():
            out = net(x, *args)
    finally:
        for handle in handles:
            handle.remove()
    assert isinstance(out, Tensor)
    return torch.stack([*seen, out])


def fmt(value: Any) -> str:
    """A table cell: 4 significant digits for floats, yes/no for booleans."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return lines


def write_results(
    result: ExperimentResult, out_dir: str | Path, command: str, environment: str = ""
) -> list[Path]:
    """Write ``NAME.csv`` (the rows), ``NAME.md`` (claim, check, verdict, table, figure link) and
    ``NAME.png`` (when matplotlib is installed); returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = (out / f"{result.name}.{ext}" for ext in ("csv", "md", "png"))
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(result.columns)
        for row in result.rows:
            writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])
    paths = [csv_path, md_path]
    notes = [f"- {note}" for note in result.notes]
    try:
        paths.append(draw(result, png_path))
    except ImportError:
        notes.append("- No figure: matplotlib is not installed (`pip install 'inertia[plot]'`).")
    experiment = EXPERIMENTS[result.name]
    where = f", {environment}" if environment else ""
    lines = [
        f"### {experiment.title}",
        "",
        f"Produced by `{command}` in {result.seconds:.0f} s{where}.",
        "",
        f"**Claim.** {result.claim}",
        "",
        f"**Check.** {result.check} **{'Holds' if result.holds else 'Does not hold'}**: "
        f"{result.summary}.",
        "",
        f"**Setup.** {result.setup}",
        "",
        *markdown_table(result.columns, result.rows),
        "",
        *([*notes, ""] if notes else []),
        f"![{experiment.title}]({png_path.name})" if png_path in paths else "",
        "",
    ]
    md_path.write_text("\n".join(lines))
    return paths


def draw(result: ExperimentResult, path: Path) -> Path:
    """Draw the result's figure on its own Agg canvas (never through pyplot) and save a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    experiment = EXPERIMENTS[result.name]
    fig = Figure(figsize=(4.6 * experiment.panels, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    experiment.plot(result, fig)
    fig.savefig(path, dpi=110)
    return path
