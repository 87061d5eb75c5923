"""What the momentum update itself costs: a converted ResNet-50 against the original, no
memory-free backward involved.

torchvision's ResNet-50 (random weights, 1,000 classes), batch 8, 224x224, float32, converted with
`transform_to_momentumnet(resnet, gamma=0.9, use_backprop=True)`: the same blocks, plus the
update ``v <- gamma v + (1 - gamma) f``, ``x <- x + v`` after each of the 12 momentum blocks.
Two settings, each timed on the original and on the converted model, interleaved, median of the
repeats:

- inference: eval mode under `torch.inference_mode()` (the update runs fused, one pass per block);
- training: one step (forward and backward) in train mode with backprop through the update (one
  fused pass forward and one backward per block).

Timed beside them, the update alone: its compiled kernels on tensors of each momentum block's
output size, with nothing around them (inference: the update; training: the update and its
pullback). The original's time plus the update's alone is the converted model's floor: what no
implementation of the update can go below on this machine, where it moves data about as fast as
memory allows.

Writes benchmarks/results/update_cost.{csv,md}. About 2 minutes on 2 CPU cores.

    python benchmarks/update_cost.py            # the committed results
    python benchmarks/update_cost.py --quick    # seconds: batch 1 at 64x64 (update_cost_quick.*)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from inertia import MomentumNet, transform_to_momentumnet
from inertia._core import kernels
from inertia.bench import environment, write_dict_rows

RESULTS = Path(__file__).parent / "results"


def _timer(fn: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return run


def momentum_shapes(model: nn.Module, x: torch.Tensor) -> list[torch.Size]:
    """The output shape of each momentum block of ``model`` (its stacks' blocks but the kept
    first ones), from one forward on ``x``."""
    shapes: list[torch.Size] = []
    hooks = [
        block.register_forward_hook(lambda m, i, out: shapes.append(out.shape))
        for net in model.modules()
        if isinstance(net, MomentumNet)
        for block in list(net)[net.keep_first :]
    ]
    with torch.inference_mode():
        model.eval()(x)
    for hook in hooks:
        hook.remove()
    return shapes


def update_alone(shapes: list[torch.Size], training: bool) -> Callable[[], float]:
    """The update's compiled kernels on tensors of ``shapes``, as the converted ResNet-50 runs
    them (a block that is not ``is_residual``: ``f = out - x``): in inference the update, writing
    ``v`` in place; in training the update and its pullback."""
    gamma, rest = torch.tensor(0.9), torch.tensor(1 - 0.9)
    tensors = [[torch.randn(s) for _ in range(5)] for s in shapes]

    def run() -> None:
        for x, v, out, grad_x, grad_v in tensors:
            if training:
                kernels.momentum_update(x, v, out, gamma, rest, True)
                kernels.momentum_pullback(grad_x, grad_v, gamma, rest, True, True)
            else:
                kernels.momentum_update_(x, v, out, gamma, rest, True)

    return _timer(run)


def measure(batch: int, size: int, repeats: int) -> list[dict[str, object]]:
    """Rows of (setting, model, median seconds, ratio to the original); model ``update alone``'s
    ratio is the floor's, ``(original + update alone) / original``."""
    torch.manual_seed(0)
    original = torchvision.models.resnet50()
    converted = transform_to_momentumnet(copy.deepcopy(original), gamma=0.9, use_backprop=True)
    x = torch.randn(batch, 3, size, size)
    models: dict[str, nn.Module] = {"original": original, "converted": converted}
    shapes = momentum_shapes(converted, x)

    def infer(model: nn.Module) -> Callable[[], float]:
        def run() -> None:
            with torch.inference_mode():
                model.eval()(x)

        return _timer(run)

    def train(model: nn.Module) -> Callable[[], float]:
        def run() -> None:
            model.train()
            model.zero_grad(set_to_none=True)
            model(x).square().mean().backward()

        return _timer(run)

    rows: list[dict[str, object]] = []
    for setting, make in (("inference", infer), ("training step", train)):
        runs = {name: make(model) for name, model in models.items()}
        runs["update alone"] = update_alone(shapes, training=setting != "inference")
        for run in runs.values():
            run()  # warm-up (and compilation of the fused update)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(repeats):
            for name, run in runs.items():
                times[name].append(run())
        base = statistics.median(times["original"])
        for name, values in times.items():
            median = statistics.median(values)
            floor = base if name == "update alone" else 0.0
            rows.append(
                {
                    "setting": setting,
                    "model": name,
                    "ms": round(median * 1e3, 1),
                    "min_ms": round(min(values) * 1e3, 1),
                    "max_ms": round(max(values) * 1e3, 1),
                    "ratio": round((floor + median) / base, 3),
                }
            )
    return rows


def markdown(rows: list[dict[str, object]], command: str, batch: int, size: int) -> str:
    lines = [
        f"Produced by `{command}` ({environment()}).",
        "",
        f"torchvision ResNet-50, batch {batch}, {size}x{size}, float32; converted with "
        "`transform_to_momentumnet(resnet, gamma=0.9, use_backprop=True)`. Median of the "
        "interleaved repeats [min-max], ratio to the original's in the same run. Update alone: "
        "the update's compiled kernels (training: and its pullback's) on tensors of each "
        "momentum block's output size; its ratio is the floor's, the original's time plus "
        "the update's alone, against the original's.",
        "",
        "| setting | original | converted | update alone (floor) |",
        "|---|---|---|---|",
    ]
    for setting in dict.fromkeys(str(r["setting"]) for r in rows):
        cells = []
        for name in ("original", "converted", "update alone"):
            r = next(r for r in rows if r["setting"] == setting and r["model"] == name)
            cells.append(f"{r['ms']} ms [{r['min_ms']}-{r['max_ms']}] ({float(r['ratio']):.2f}x)")
        lines.append(f"| {setting} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 at 64x64, 2 repeats")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    batch, size, repeats = (1, 64, 2) if args.quick else (8, 224, 9)
    rows = measure(batch, size, repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "update_cost_quick" if args.quick else "update_cost"
    write_dict_rows(rows, args.out / f"{stem}.csv")
    command = "python benchmarks/update_cost.py" + (" --quick" if args.quick else "")
    (args.out / f"{stem}.md").write_text(markdown(rows, command, batch, size))
    converted = {str(r["setting"]): float(r["ratio"]) for r in rows if r["model"] == "converted"}
    summary = ", ".join(f"{k} {v:.2f}x" for k, v in converted.items())
    print(f"update_cost: converted ResNet-50 against the original: {summary}", file=sys.stderr)


if __name__ == "__main__":
    main()
