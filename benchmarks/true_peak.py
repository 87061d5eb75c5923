"""True peak of a training step, as users measure it, beside bytes saved for backward and time.

Plain autograd, checkpointing every block, memory-free float and exact, on five cases: residual MLP
blocks where parameters dominate and where activations dominate, a 12-layer pre-norm
nn.TransformerEncoder and torchvision's ResNet-50 and ResNet-101, gamma 0.9; on the ResNets also
memory-free with the stem and each stage's first block checkpointed. Each case and variant
is measured in a fresh process (`inertia.bench.true_peak`): on the CPU the resident high-water mark
over one step, after a warm-up step, with .grad unset and under gradient accumulation; times in one
more process per case, variants interleaved, with the time floors of a memory-free stack
(`checkpoint_whole`: checkpointing with each block recomputed whole) and of the exact one (`floor`:
that plus the integer update, `inertia.bench.IntegerFloor`).

Writes benchmarks/results/true_peak.{csv,md}. About 25 minutes on 2 CPU cores.

    python benchmarks/true_peak.py              # the committed results
    python benchmarks/true_peak.py --quick      # seconds: a tiny stack (the tests run it)
    python benchmarks/true_peak.py --device cuda --optimizer adam
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from inertia.bench import PeakCase, PeakConfig, report_true_peak

QUICK = PeakConfig(
    cases=(PeakCase("mlp", depth=4, batch=64, width=64),),
    variants=("plain", "momentum_free"),
    repeats=1,
)


def describe(config: PeakConfig) -> str:
    """What the table's columns mean, for the markdown."""
    gamma = config.cases[0].gamma if config.cases else 0.9
    return (
        "Cases: `mlp W, depth D, batch B`: D residual blocks Linear(W)-GELU-Linear(W); `encoder`: "
        "nn.TransformerEncoder of pre-norm layers (`norm_first=True`, `batch_first=True`, "
        "feed-forward 4 d, dropout 0, final LayerNorm), converted with "
        f"`transform_to_momentumnet(model, 'layers', keep_first_layer=False, gamma={gamma})`; "
        "`resnetN`: torchvision's, 1,000 classes, train mode, converted with "
        f"`transform_to_momentumnet(resnet, gamma={gamma})` (the first block of each stage stays "
        "an ordinary layer); `momentum_free_ckpt_stem_first` and `momentum_exact_ckpt_stem_first` "
        "(ResNets only) pass `checkpoint_stem=True, checkpoint_kept=True` too, so that the stem "
        "and those first blocks keep only their inputs (non-reentrant checkpointing: the saved "
        "bytes leave these inputs out, the true peak counts them). Float32; the loss is the "
        "output's mean square. `checkpoint_whole` (timed only): `checkpoint` with each block "
        "recomputed whole (early stop off): a memory-free stack's inverse reads each block's "
        "output, where checkpointing's early stop ends the recomputation at the block's last "
        "saved tensor (it skips an MLP block's second Linear, an encoder layer's second "
        "feed-forward Linear), so its time bounds every memory-free stack's from below. `floor` "
        "(timed only): `checkpoint_whole` plus exact mode's integer kernels at each block's "
        "output size, the update in the forward and its inverse in the backward "
        "(`inertia.bench.IntegerFloor`): what a memory-free exact stack cannot avoid (one more "
        "whole forward per block and the integer update), without the rest, so its time bounds "
        "momentum_exact's from below.\n\n"
        "True peak: the most memory a training step (forward and backward) holds beyond what the "
        "process held just before it, each case and variant in a fresh process. On the CPU, "
        "resident memory: the process is launched with `MALLOC_MMAP_THRESHOLD_=65536` (freed "
        "tensors go back to the system), runs one warm-up step, writes 5 to "
        "`/proc/self/clear_refs` just before the measured step and reads `VmHWM - VmRSS` "
        "(before) from `/proc/self/status`; on a GPU, `max_memory_allocated` minus the memory "
        "allocated before. `.grad unset`: `zero_grad(set_to_none=True)` before the step, so the "
        "peak includes allocating the gradients; `accumulation`: `.grad` already allocated (as "
        "after a first micro-batch). Ratio to plain in parentheses. Saved for backward: peak "
        "bytes saved for backward over one step (saved-tensor hooks, parameters excluded; "
        "reentrant checkpointing stands in for non-reentrant). Step: median of "
        f"{config.repeats} steps (`.grad` unset), the variants of a case interleaved in one more "
        "fresh process launched without the malloc setting; time ratios are side by side."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny stack, for a smoke run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per variant")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default=None,
                        help="measure the optimizer's step too, reported apart")  # fmt: skip
    args = parser.parse_args(argv)
    config = QUICK if args.quick else PeakConfig()
    config = replace(
        config,
        repeats=config.repeats if args.repeats is None else args.repeats,
        threads=args.threads,
        device=args.device,
        optimizer=args.optimizer,
    )
    stem = "true_peak_quick" if args.quick else "true_peak"
    flags = sys.argv[1:] if argv is None else argv
    print(report_true_peak(config, args.out, stem, "benchmarks/true_peak.py", flags, describe))


if __name__ == "__main__":
    main()
