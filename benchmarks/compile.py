"""torch.compile and a converted model: training step time, eager against compiled, side by side.

A torchvision ResNet-18 (plain, and converted memory-free with gamma 0.9) in train mode. Compiling
the whole converted model stops at each memory-free stack (one graph break per stack) and compiles
the layers around it; compiling the blocks too (``block.compile()``) compiles what runs inside the
stacks, in the forward and in the backward's recomputation. Writes
benchmarks/results/compile.{csv,md}. About 6 minutes on 2 CPU cores, most of it compiling.

    python benchmarks/compile.py
    python benchmarks/compile.py --quick    # 32x32 inputs, batch 2, 1 timed step (a smoke run)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import resnet18

from inertia import MomentumNet, transform_to_momentumnet
from inertia.bench import environment, write_dict_rows

VARIANTS = {
    "plain": "the original model, eager",
    "plain_compiled": "the original model, model.compile()",
    "momentum_free": "converted memory-free, eager",
    "momentum_free_compiled": "converted, model.compile(): the layers around the stacks",
    "momentum_free_compiled_blocks": "converted, model.compile() and block.compile() on each block",
}


def build(variant: str, base: nn.Module, backend: str) -> nn.Module:
    if variant.startswith("plain"):
        model = copy.deepcopy(base)
    else:
        model = transform_to_momentumnet(
            copy.deepcopy(base),
            gamma=0.9,
            exact=False,
            method="memory_free",
            checkpoint_kept=False,
            checkpoint_stem=False,
        )
    if variant.endswith("_blocks"):
        for stack in [m for m in model.modules() if isinstance(m, MomentumNet)]:
            for block in stack:
                block.compile(backend=backend)
    if "compiled" in variant:
        model.compile(backend=backend)
    return model


def step(model: nn.Module, x: Tensor) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    model(x).square().mean().backward()
    return 1e3 * (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny inputs and one timed step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size, batch, repeats = (32, 2, 1) if args.quick else (64, 16, 7)
    torch.manual_seed(0)
    base = resnet18(num_classes=10)
    x = torch.randn(batch, 3, size, size)
    models: dict[str, nn.Module] = {}
    first: dict[str, float] = {}
    for variant in VARIANTS:  # the first step compiles: timed on its own
        models[variant] = build(variant, base, args.backend)  # no dynamo reset: it drops code
        first[variant] = step(models[variant], x) / 1e3
        step(models[variant], x)  # a second step: any recompilation (grad mode) happens here
        print(f"{variant}: compiled and warmed up", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(repeats + 1):  # an untimed round first: revisiting a model can recompile once
        for variant, model in models.items():
            ms = step(model, x)
            if r:
                times[variant].append(ms)
    rows = []
    for variant, description in VARIANTS.items():
        t = times[variant]
        rows.append({
            "variant": variant, "description": description, "step_ms": statistics.median(t),
            "min_ms": min(t), "max_ms": max(t), "first_step_s": first[variant],
        })  # fmt: skip
    for row in rows:
        row["ratio_to_plain"] = row["step_ms"] / rows[0]["step_ms"]
        row["ratio_to_eager"] = row["step_ms"] / next(
            r["step_ms"] for r in rows if r["variant"] == row["variant"].split("_compiled")[0]
        )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "compile_quick" if args.quick else "compile"
    write_dict_rows(rows, args.out / f"{stem}.csv")
    command = "python benchmarks/compile.py" + (" --quick" if args.quick else "")
    command += "" if args.backend == "inductor" else f" --backend {args.backend}"
    lines = [
        f"Produced by `{command}` ({environment()}).",
        "",
        f"torchvision ResNet-18, batch {batch}, {size}x{size}, train mode, float32; converted with "
        "transform_to_momentumnet(gamma=0.9, use_backprop=False, exact=False). Step: forward, "
        "loss, backward. "
        f"Median of {repeats} interleaved steps [min-max], after two warm-up steps each and an "
        "untimed interleaved round; first step: the one that compiles (shorter when inductor's "
        f"on-disk cache already holds the kernels). Backend: {args.backend}.",
        "",
        "| variant | step (ms) | to plain | to its eager | first step (s) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['variant']} ({r['description']}) | {r['step_ms']:.0f} [{r['min_ms']:.0f}-"
        f"{r['max_ms']:.0f}] | {r['ratio_to_plain']:.2f}x | {r['ratio_to_eager']:.2f}x | "
        f"{r['first_step_s']:.1f} |"
        for r in rows
    ]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print((args.out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
