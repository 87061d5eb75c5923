"""The LLM experiment's settings, statistics and report: its table rows, verdicts, text and
figure, from what `inertia.experiments.llm` measured."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._choose import GAMMAS as _CHOSEN_FROM
from ._core import ExperimentResult
from ._stdlib_corpus import corpus_python

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "BITS_SEQUENCES", "BOOTSTRAP", "COLUMNS", "FULL", "GAMMAS", "LORA_LR", "MARGIN", "PARTS",
    "QUICK", "TINY_LAYERS", "TRAININGS", "TWIN_TOL", "Setting", "paired_ratio", "plot", "ppl",
    "report",
]  # fmt: skip

PARTS = ("sweep", "finetune")  # what `ExperimentConfig.parts` selects; empty: both
# Converted and measured before any training: `choose_gamma`'s, smallest first.
GAMMAS = tuple(sorted(_CHOSEN_FROM))
MARGIN = 0.05  # "within 5%": the upper end of a perplexity ratio's 95% CI at most 1 + MARGIN
TRAININGS = ("full", "LoRA")  # every weight; peft LoRA adapters (`inertia.bench.add_lora`)
LORA_LR = 1e-3  # LoRA's learning rate on SmolLM2 (its adapters start at zero: a larger step)
TWIN_TOL = 1e-5  # memory-free gradients and losses against the backprop twin (relative)
BOOTSTRAP = 4000  # resamples of held-out modules for the confidence intervals
BITS_SEQUENCES = 8  # held-out sequences whose forward the buffer's bits are read from
TINY_LAYERS = 6  # llama-tiny: enough layers that its default conversion is memory-free at 0.01


@dataclass(frozen=True)
class Setting:
    model: str  # "smollm2" (the pretrained weights) or "llama-tiny" (random, UTF-8 bytes)
    layers: int  # of the decoder stack
    seq: int  # tokens per sequence: training, evaluation and the stack's saved bytes
    batch: int
    steps: int
    evals: int  # evaluation points after step 0, evenly spaced
    lr: float  # full fine-tuning
    lora_lr: float
    warmup: int  # linear warm-up steps, then cosine decay to 0
    held_out: int | None  # held-out sequences evaluated (None: all)
    peak_seq: int  # tokens of the true peak's training step


FULL = Setting("smollm2", 30, 256, 2, 100, 4, 1e-4, LORA_LR, 10, None, 2048)
QUICK = Setting("llama-tiny", TINY_LAYERS, 32, 2, 8, 4, 3e-3, 1e-2, 2, 24, 64)


def paired_ratio(
    nll: Tensor, anchor: Tensor, modules: list[str], seed: int = 0
) -> tuple[float, float, float]:
    """Perplexity of ``nll`` over ``anchor``'s on the same held-out sequences, with a 95%
    confidence interval: ``(ratio, low, high)``.

    The ratio is ``exp(mean(nll - anchor))`` over the sequences (of equal length). The interval is
    a percentile bootstrap that resamples held-out modules, not sequences, since sequences of one
    module are alike.
    """
    diff = (nll - anchor).double()
    groups = sorted(set(modules))
    index = {m: i for i, m in enumerate(groups)}
    member = torch.tensor([index[m] for m in modules])
    sums = torch.zeros(len(groups), dtype=torch.float64).index_add_(0, member, diff)
    counts = torch.zeros(len(groups), dtype=torch.float64).index_add_(
        0, member, torch.ones_like(diff)
    )
    gen = torch.Generator().manual_seed(seed)
    draw = torch.randint(len(groups), (BOOTSTRAP, len(groups)), generator=gen)
    boot = (sums[draw].sum(1) / counts[draw].sum(1)).exp()
    low, high = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return math.exp(float(diff.mean())), low, high


def ppl(nll: Tensor) -> float:
    """Perplexity: exp of the mean of the per-sequence NLL (sequences of equal length)."""
    return math.exp(float(nll.mean()))


COLUMNS = (
    "arm", "training", "gamma", "step", "held-out perplexity", "ratio to original",
    "95% CI low", "95% CI high", "within 5%", "buffer bits used", "buffer bits stored",
    "stack saved MiB", "stack saved B per element", "true peak full MiB", "true peak LoRA MiB",
)  # fmt: skip


def _rows(d: dict[str, Any], modules: list[str], seed: int) -> list[tuple[Any, ...]]:
    """One zero-shot row per gamma (0: the original, its memory with HF checkpointing), then
    one per fine-tuning arm and evaluation point after step 0."""
    nan = math.nan
    rows: list[tuple[Any, ...]] = []
    for g in (0.0, *GAMMAS):
        ratio, low, high = d["zero_shot"].get(g, (1.0, nan, nan))
        used, stored = d["bits"].get(g, (nan, nan))
        held, elements = d["saved"].get(g, (nan, 1))
        peaks = [d["peaks"][t][g].grad_unset.peak_bytes / 2**20 if d["peaks"] else nan
                 for t in TRAININGS]  # fmt: skip
        rows.append((
            "converted" if g else "original, HF checkpointing", "zero-shot", g, 0,
            ppl(d["nll"][g]), ratio, low, high, high <= 1 + MARGIN if g else "—",
            used, stored, held / 2**20, held / elements, *peaks,
        ))  # fmt: skip
    for training, runs in d["runs"].items():
        for g, run in runs.items():
            last = len(run["steps"]) - 1
            for k in range(1, last + 1):
                ratio, low, high = 1.0, nan, nan
                within: bool | str = "—"
                if g:
                    ratio, low, high = paired_ratio(
                        run["nll"][k], runs[0.0]["nll"][k], modules, seed
                    )
                    within = high <= 1 + MARGIN if k == last else "—"
                rows.append((
                    "converted" if g else "original (anchor)", training, g, run["steps"][k],
                    ppl(run["nll"][k]), ratio, low, high, within, *(nan,) * 6,
                ))  # fmt: skip
    return rows


def _sweep_verdict(d: dict[str, Any]) -> tuple[bool, str]:
    """Whether every conversion's stack keeps fewer bytes than HF checkpointing's; the sweep in
    one line."""
    per = {g: held / elements for g, (held, elements) in d["saved"].items()}
    bits, ratio = d["bits"], d["zero_shot"]
    lo, hi = GAMMAS[0], GAMMAS[-1]
    return all(per[g] < per[0.0] for g in GAMMAS), (
        f"from gamma {hi:g} down to {lo:g}, zero-shot perplexity {ratio[hi][0]:.3g}x down to "
        f"{ratio[lo][0]:.3g}x the original's, buffer {bits[hi][0]} up to {bits[lo][0]} bits "
        f"per element used, stack {per[hi]:.1f} up to {per[lo]:.1f} B per element against HF "
        f"checkpointing's {per[0.0]:.1f}"
    )


def _finetune_verdict(d: dict[str, Any]) -> tuple[bool, str, list[str]]:
    """Whether every tuned arm came within 5% of its anchor and matched its backprop twin (kept
    as ``d["twin_ok"]``); the ratios in one line; the twin's notes."""
    twin_ok, notes = True, []
    for training, runs in d["runs"].items():
        for gamma, run in runs.items():
            if not gamma:
                continue
            checks = run["twin"]
            losses = max(abs(a - b) / abs(b) for a, b in checks["loss"])
            grads = [(k, v) for k, v in checks.items() if k.startswith("grad")]
            twin_ok &= losses <= TWIN_TOL and all(v[0] <= TWIN_TOL for _, v in grads)
            notes.append(
                f"Backprop twin, {training}, gamma {gamma:g}: losses of the first "
                f"{len(checks['loss'])} steps within {losses:.1e} (relative); gradients "
                + ", ".join(f"{k}: {v[0]:.1e} globally, {v[1]:.1e} worst tensor" for k, v in grads)
                + f" (tolerance {TWIN_TOL:g} on the global error)."
            )
    final = [(t, g, v) for t, ratios in d["final"].items() for g, v in ratios.items()]
    summary = "; ".join(
        f"{t}, gamma {g:g}: {r:.3f}x the anchor's perplexity (95% CI {lo:.3f}-{hi:.3f})"
        for t, g, (r, lo, hi) in final
    )
    if not twin_ok:
        summary += "; the memory-free gradients did NOT match the backprop twin's"
    d["twin_ok"] = twin_ok
    return twin_ok and all(v[2] <= 1 + MARGIN for _, _, v in final), summary, notes


def report(
    d: dict[str, Any],
    s: Setting,
    modules: list[str],
    seed: int,
    corpus: dict[str, str],
    data: tuple[Tensor, Tensor],
    names: tuple[list[str], list[str]],
) -> ExperimentResult:
    """The experiment's result from what it measured (``d``, kept as its ``data``): the parts
    that ran (``d["parts"]``) each add their claim, check, summary, setup and notes."""
    train, held_out = data
    sweep, finetune = "sweep" in d["parts"], "finetune" in d["parts"]
    model_words = (
        "SmolLM2-135M-Instruct (30 Llama layers, pretrained, float32)"
        if s.model == "smollm2"
        else f"a {s.layers}-layer random Llama of SmolLM2's design reading UTF-8 bytes (quick)"
    )
    gammas = ", ".join(f"{g:g}" for g in GAMMAS)
    claims, checks, summaries, holds, notes = [], [], [], True, []
    setup = (
        f"{model_words}; decoder stack `model.layers` converted with "
        "`transform_to_momentumnet(keep_first_layer=False, gamma=g)`, as its plan chooses: "
        f"memory-free in exact arithmetic at every gamma of {gammas} (checked). Data: the "
        f"pinned docstrings of Python {corpus_python()}'s standard library ({len(corpus)} "
        f"modules), split by module: {len(names[0])} for training ({train.numel():,} tokens), "
        f"{len(names[1])} held out ({held_out.numel():,} tokens in {len(held_out)} sequences of "
        f"{s.seq}). Perplexity: exp of the mean next-token loss over the held-out sequences. "
        "Ratio to original: paired on the same sequences (zero-shot rows: to the original; "
        "fine-tuned rows: to the original fine-tuned the same way, the anchor, at the same step); "
        f"95% CI: percentile bootstrap over held-out modules ({BOOTSTRAP} resamples); within 5%: "
        f"the CI's upper end at most {1 + MARGIN:g}."
    )
    if sweep:
        ok, summary = _sweep_verdict(d)
        holds &= ok
        claims.append(
            "converted memory-free, the decoder stack keeps less for backward than with "
            "HuggingFace's activation checkpointing at every gamma, down to the smallest, where "
            "exact mode's buffer is largest (about log2(1/gamma) bits per element per layer); "
            "the zero-shot perplexity shows what each gamma costs in quality"
        )
        checks.append(
            f"sweep: at each gamma of {gammas}, the stack's bytes saved for backward after the "
            f"forward (batch 1, sequence {s.seq}) are fewer than HF checkpointing's"
        )
        summaries.append(f"sweep: {summary}")
        setup += (
            " Buffer bits: read from the fixed-point state after the stack's last layer, the "
            f"stack run again with `return_state=True` on the input that the model's forward "
            f"on the first {BITS_SEQUENCES} held-out sequences passed it (`ExactState`): used, "
            "the bit length of the buffer's largest element plus 32 per word plane (older bits "
            "moved out of it); stored, the width of its integer dtype plus 32 per plane "
            "(`ExactState.buffer_bits_per_element`; the backward keeps the buffer in the smallest "
            "dtype its bound allows, counted in the saved bytes). Stack saved: "
            "`inertia.bench.stack_saved_bytes`, what the decoder stack saves for backward and "
            f"still holds after the model's forward, batch 1, sequence {s.seq}, every weight "
            "trainable; per element of its activation (tokens times width). The original's row: "
            "HuggingFace's `activation_checkpointing_enable()` (reentrant, whose saved inputs "
            "can be counted). True peak: `inertia.bench.true_peak`, a fresh process each, "
            f"`PeakCase({s.model!r}, batch=1, seq_len={s.peak_seq}, lora=..., gamma=g, "
            "labels=True)`: the most resident memory a training step on the model's own loss "
            "(.grad unset) holds beyond what the process held before it; variant `default` at "
            "each gamma, `checkpoint` for the original."
        )
        seen = {w for t in d["peaks"].values() for p in t.values() for w in p.warnings}
        notes += [f"The true-peak processes warned: {'; '.join(sorted(seen))}"] * bool(seen)
    if finetune:
        ok, summary, twin_notes = _finetune_verdict(d)
        holds &= ok
        tuned = " and ".join(f"{g:g}" for g in d["tuned"])
        claims.append(
            "a pretrained transformer converted to a momentum network and fine-tuned "
            "memory-free, fully or with LoRA, recovers the original's quality: its held-out "
            f"perplexity comes within {MARGIN:.0%} of the original's fine-tuned the same way, at "
            "the largest gamma whose zero-shot perplexity is within 5% of the original's and at "
            "the next below"
        )
        checks.append(
            f"fine-tuning: at gamma {tuned} (chosen from the zero-shot ratios at run time), full "
            "and LoRA, the upper end of the 95% CI of (converted perplexity / anchor perplexity) "
            f"after the last step is at most {1 + MARGIN:g}; and the memory-free gradients match "
            f"the backprop twin's within {TWIN_TOL:g} at the first and last step, losses over the "
            "first 3"
        )
        summaries.append(f"fine-tuning: {summary}")
        setup += (
            " Fine-tuning at two gammas chosen from the zero-shot ratios (`choose_gammas`: the "
            "largest within 5% and the next below; the two smallest where none, or only the "
            f"smallest, is): full, every weight, AdamW lr {s.lr:g}; LoRA, peft adapters of rank "
            "8 on q, k, v and o (`inertia.bench.add_lora`, seeded alike in every arm), AdamW "
            f"lr {s.lora_lr:g}; weight decay 0, {s.warmup} warm-up steps then cosine decay to 0, "
            f"{s.steps} steps of batch {s.batch}, sequence {s.seq}, the same batches in the same "
            f"order for every arm (seed {seed}). An arm's step 0 is its zero-shot row (LoRA's "
            "adapters start at zero). The zero-shot evaluation runs with either part: "
            "fine-tuning chooses its gammas from it, computed again rather than read from an "
            "earlier sweep's files."
        )
        notes += [
            f"Fine-tuned: {d['rule']}.",
            *twin_notes,
            "Fine-tuning time per arm: "
            + ", ".join(
                f"{t} {'original' if g == 0 else f'gamma {g:g}'} {run['seconds']:.0f} s"
                for t, runs in d["runs"].items()
                for g, run in runs.items()
            )
            + " (evaluations and, for the converted arms, the twin's steps included).",
        ]
    notes.append(
        f"Zero-shot evaluation{' and the sweep' if sweep else ''}: {d['seconds']['sweep']:.0f} s."
    )
    return ExperimentResult(
        name="llm",
        claim="; ".join(claims),
        check=" ".join(c[0].upper() + c[1:] + "." for c in checks),
        holds=holds,
        summary="; ".join(summaries),
        setup=setup,
        columns=COLUMNS,
        rows=_rows(d, modules, seed),
        data=d,
        notes=notes,
    )


def plot(result: ExperimentResult, fig: Figure) -> None:
    """Perplexity against the stack's memory; the ratio to the original against gamma."""
    d = result.data
    memory, ratios = fig.subplots(1, 2)
    _plot_memory(memory, d)
    _plot_ratios(ratios, d)


def _plot_memory(ax: Any, d: dict[str, Any]) -> None:
    """Held-out perplexity against the stack's saved bytes per element: each gamma zero-shot,
    the tuned ones after fine-tuning, the original at HF checkpointing's."""
    if not d["saved"]:
        ax.text(0.5, 0.5, "memory not measured:\nthe sweep part did not run", ha="center",
                va="center", transform=ax.transAxes)  # fmt: skip
        ax.set_axis_off()
        return
    per = {g: held / elements for g, (held, elements) in d["saved"].items()}
    zero = {g: ppl(n) for g, n in d["nll"].items()}
    ax.plot([per[g] for g in GAMMAS], [zero[g] for g in GAMMAS], "o", mfc="none", color="gray",
            label="converted, zero-shot")  # fmt: skip
    for g in GAMMAS:
        ax.annotate(f"{g:g}", (per[g], zero[g]), textcoords="offset points", xytext=(5, 3),
                    fontsize=7, color="gray")  # fmt: skip
    ax.plot([per[0.0]], [zero[0.0]], "*", mfc="none", ms=11, color="gray",
            label="original, zero-shot, at HF checkpointing's")  # fmt: skip
    for i, (training, runs) in enumerate(d["runs"].items()):
        color, marker = f"C{i}", "o^"[i]
        tuned = [g for g in runs if g]
        final = {g: ppl(run["nll"][-1]) for g, run in runs.items()}
        ax.plot([per[g] for g in tuned], [final[g] for g in tuned], marker, color=color,
                label=f"converted, fine-tuned ({training})")  # fmt: skip
        ax.plot([per[0.0]], [final[0.0]], "*", ms=11, color=color,
                label=f"original fine-tuned ({training}), at HF checkpointing's")  # fmt: skip
        for g in (0.0, *tuned):
            ax.annotate("", (per[g], final[g]), (per[g], zero[g]),
                        arrowprops={"arrowstyle": "->", "color": color, "alpha": 0.5})  # fmt: skip
    ax.set(yscale="log", ylabel="held-out perplexity", xlim=(0, 1.1 * max(per.values())))
    ax.set(xlabel="decoder stack's saved bytes per element of its activation")
    _plain_log_labels(ax)
    ax.set_title("perplexity against the stack's memory", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)


def _plain_log_labels(ax: Any) -> None:
    """The log y axis's labels as plain numbers (400 and 0.9, not 4 x 10^2 and 9e-01), at the
    ticks that matplotlib labels (minor ones too over a short range)."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:.3g}" if super().__call__(x, pos) else ""

    ax.yaxis.set_major_formatter(Plain(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def _plot_ratios(ax: Any, d: dict[str, Any]) -> None:
    """Perplexity over the original's (same training) against gamma, with 95% CIs."""
    series = [("zero-shot", "gray", "o", 1.0, d["zero_shot"])]
    series += [(f"fine-tuned ({t})", f"C{i}", "o^"[i], 1.08 ** (i + 1), d["final"][t])
               for i, t in enumerate(d["final"])]  # fmt: skip
    for label, color, marker, shift, found in series:
        gammas = sorted(found)
        r = [found[g][0] for g in gammas]
        err = [
            [found[g][0] - found[g][1] for g in gammas],
            [found[g][2] - found[g][0] for g in gammas],
        ]
        face = "none" if label == "zero-shot" else color
        ax.errorbar([g * shift for g in gammas], r, yerr=err, fmt=marker, color=color, mfc=face,
                    capsize=2, label=label)  # fmt: skip
    ax.axhline(1 + MARGIN, color="k", ls="--", lw=0.8, label=f"{MARGIN:.0%} above the original")
    ax.set(xscale="log", yscale="log", xlabel="gamma")
    ax.set(ylabel="held-out perplexity / the original's (same training)")
    _plain_log_labels(ax)
    ax.set_title("what the conversion costs, before and after fine-tuning", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
