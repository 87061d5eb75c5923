"""Experiment 6: memory against depth, from `inertia.bench` (the one benchmark implementation).

The variants are `inertia.bench.VARIANTS` less ``momentum_backprop`` (which stores what plain
autograd stores): plain, checkpointing every block and memory-free float, and any variant the
benchmark gains later (exact mode's) with no change here. Bytes saved for backward are exact and
repeatable; seeds change the weights and inputs, so they check that the bytes do not depend on them.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from .. import bench
from .._errors import InversionWarning
from ._core import ExperimentConfig, ExperimentResult, register

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["memory_against_depth", "variants"]


def variants() -> tuple[str, ...]:
    """The benchmark's variants compared here."""
    return tuple(v for v in bench.VARIANTS if v != "momentum_backprop")


def _plot(result: ExperimentResult, fig: Figure) -> None:
    from ..plots import _LABELS

    rows = result.data["rows"]
    mem, time = fig.subplots(1, 2)
    for i, variant in enumerate(variants()):
        own = sorted((r for r in rows if r.variant == variant), key=lambda r: r.depth)
        style = {"label": _LABELS.get(variant, variant), "marker": "osD^v"[i % 5], "color": f"C{i}"}
        depths = [r.depth for r in own]
        mem.plot(depths, [r.peak_saved_bytes / 2**20 for r in own], **style)
        time.plot(depths, [r.time_ratio for r in own], **style)
    for ax in (mem, time):
        ax.set(xscale="log", xlabel="depth (residual blocks)")
        ax.grid(alpha=0.3)
    mem.set(yscale="log", ylabel="peak bytes saved for backward (MiB)", title="memory")
    time.set(ylabel="training step time / plain (×)", title="time")
    mem.legend(fontsize=8)


@register("memory", "6. Memory against depth", _plot)
def memory_against_depth(config: ExperimentConfig) -> ExperimentResult:
    """Peak bytes saved for backward against depth for each variant, one sweep per seed; with
    ``config.true_peak``, the true peak of each step too (first seed)."""
    if config.quick:
        base = bench.BenchConfig(depths=(2, 4, 8, 16), width=32, batch=16, repeats=1)
    else:
        base = bench.BenchConfig(depths=(4, 8, 16, 32, 64), width=256, batch=128, repeats=3)
    rows, first, notes = [], list[bench.BenchRow](), []
    names = variants()
    for seed in config.seeds:
        cfg = bench.BenchConfig(
            depths=base.depths, width=base.width, batch=base.batch, repeats=base.repeats,
            threads=config.threads, variants=names, seed=seed,
            true_peak=config.true_peak and seed == config.seeds[0],
        )  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", InversionWarning)
            sweep = bench.run(cfg)
        notes += [f"seed {seed}: {w.message}" for w in caught if w.category is InversionWarning]
        first = first or sweep
        cell = {(r.variant, r.depth): r for r in sweep}
        peak = {key: r.peak_saved_bytes for key, r in cell.items()}
        lo, hi = min(base.depths), max(base.depths)
        spread = {
            v: (min(peak[v, d] for d in base.depths), max(peak[v, d] for d in base.depths))
            for v in names
            if v.startswith("momentum_")
        }
        # Exact mode's buffer keeps log2(1/gamma) bits per element per block, in the smallest
        # integer dtype that holds them: it may widen with depth, to 8 bytes per element at most.
        buffer = base.batch * base.width * 8
        flat = all(
            hi_ <= (lo_ + buffer if v == "momentum_exact" else 1.01 * lo_)
            for v, (lo_, hi_) in spread.items()
        )
        holds = (
            flat
            and peak["plain", hi] / peak["plain", lo] >= 0.5 * hi / lo
            and peak["checkpoint", hi] < peak["plain", hi]
        )
        for depth in base.depths:
            mib = [cell[v, depth].peak_saved_bytes / 2**20 for v in names]
            times = [cell[v, depth].time_ratio for v in names]
            peaks = [cell[v, depth].true_peak_bytes / 2**20 for v in names] * config.true_peak
            rows.append((seed, depth, *mib, *times, *peaks, holds))
    deepest = [r for r in rows if r[1] == max(base.depths) and r[0] == config.seeds[0]]
    at_depth = ", ".join(
        f"{v} {mib:.2f} MiB" for v, mib in zip(names, deepest[0][2:], strict=False)
    )
    if config.true_peak:
        true_peaks = deepest[0][2 + 2 * len(names) : 2 + 3 * len(names)]
        at_depth += "; true peak of a step: " + ", ".join(
            f"{v} {mib:.1f} MiB" for v, mib in zip(names, true_peaks, strict=True)
        )
    return ExperimentResult(
        name="memory",
        claim=(
            "the memory-free backward keeps the bytes saved for backward constant in depth, "
            "while plain autograd's grow linearly and checkpointing's more slowly"
        ),
        check=(
            "on every seed, the memory-free float variant's peak bytes vary by at most 1% over "
            "the depths, exact mode's by at most the width of its buffer (8 bytes per element of "
            "the state; it keeps log2(1/gamma) bits per element per block in the smallest integer "
            "dtype that holds them), and "
            "plain's grow at least half as fast as depth from the shallowest to the deepest, and "
            "checkpointing's stay below plain's at the deepest."
        ),
        holds=all(r[-1] for r in rows),
        summary=f"at depth {max(base.depths)}: {at_depth} (seed {config.seeds[0]})",
        setup=(
            f"Blocks Linear({base.width})-GELU-Linear({base.width}), batch {base.batch}, gamma "
            f"{base.gamma}; peak bytes saved for backward (parameters excluded); time: median of "
            f"{base.repeats} interleaved steps, as a ratio to plain."
            + f" Depths {', '.join(map(str, base.depths))}; from `inertia.bench.run`, "
            f"{config.threads or 'default'} thread(s). Variants: {', '.join(variants())}."
            + (
                " True peak (seed "
                f"{config.seeds[0]}): the most memory a training step holds beyond what was held "
                "before it, .grad unset, from `inertia.bench.true_peak` (a fresh process per depth "
                "and variant); it includes the parameter gradients, which grow with depth in "
                "every variant."
            )
            * config.true_peak
        ),
        columns=(
            "seed",
            "depth",
            *(f"{v} peak MiB" for v in names),
            *(f"{v} time / plain" for v in names),
            *(f"{v} true peak MiB" for v in names if config.true_peak),
            "holds",
        ),
        rows=rows,
        data={"rows": first},
        notes=[
            *dict.fromkeys(notes),
            *(
                [
                    "The inversion check's warnings concern the gradients' accuracy at float32 "
                    "(what exact mode is for); bytes and times are unaffected."
                ]
                if notes
                else []
            ),
        ],
    )
