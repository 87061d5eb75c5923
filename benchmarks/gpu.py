"""GPU targets, measured on one card in one run: converted ResNet-101 and a 24-layer transformer.

For each workload, in float32 and under bf16 autocast: plain, ``torch.utils.checkpoint`` on every
block, and the memory-free momentum model in float and in exact (fixed-point) arithmetic; step
time (median of ``--steps`` synchronized steps), peak memory above the weights
(``torch.cuda.max_memory_allocated``), and each memory-free model's gradient error against its
backprop twin on the same weights and batch (global ``||g - g_ref|| / ||g_ref||`` and the worst
single tensor), with the card's default TF32 settings.

    PYTHONPATH=src python benchmarks/gpu.py            # full sizes; about 6 minutes on an H100
    PYTHONPATH=src python benchmarks/gpu.py --small    # tiny sizes, any device (the test suite)

Needs torch and torchvision only (no installs), and writes ``gpu.json`` (raw) and ``gpu.md`` (a
table naming the card) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from inertia import InversionWarning, transform_to_momentumnet
from inertia.bench import checkpoint_every_block


def workloads(
    small: bool,
) -> dict[str, tuple[Callable[[], nn.Module], Callable[[], Tensor], list[str], bool]]:
    """name -> (model factory, input factory, stack paths, keep the first block of each stack)."""
    from torchvision.models import resnet101

    size, batch = (32, 4) if small else (224, 128)
    d, heads, seq, tbatch, layers = (64, 4, 16, 4, 4) if small else (1024, 16, 512, 32, 24)

    def transformer() -> nn.Module:
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, batch_first=True, norm_first=True)
        return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    return {
        "resnet101": (lambda: resnet101(num_classes=1000),
                      lambda: torch.randn(batch, 3, size, size),
                      ["layer1", "layer2", "layer3", "layer4"], True),
        f"transformer{layers}": (transformer, lambda: torch.randn(tbatch, seq, d),
                                 ["layers"], False),
    }  # fmt: skip


def step(model: nn.Module, x: Tensor, amp: bool) -> None:
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = model(x)
    out.float().square().mean().backward()


def measure(model: nn.Module, x: Tensor, amp: bool, steps: int) -> dict[str, float]:
    device = x.device
    cuda = device.type == "cuda"
    step(model, x, amp)  # warm-up: kernels chosen, gradients allocated
    model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step(model, x, amp)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(1e3 * (time.perf_counter() - t0))
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if cuda else float("nan")
    return {"step_ms": statistics.median(times), "step_ms_min": min(times), "peak_mib": peak}


def gradient_error(backprop: nn.Module, free: nn.Module, x: Tensor, amp: bool) -> dict[str, float]:
    """Global and worst-tensor relative error of memory-free gradients (same weights, same x)."""
    for m in (backprop, free):
        torch.manual_seed(0)
        step(m, x, amp)
    num = den = 0.0
    worst = 0.0
    for p, q in zip(free.parameters(), backprop.parameters(), strict=True):
        if q.grad is None or p.grad is None:
            continue
        diff = float((p.grad.double() - q.grad.double()).norm())
        ref = float(q.grad.double().norm())
        num, den = num + diff**2, den + ref**2
        if ref > 0:
            worst = max(worst, diff / ref)
    return {"grad_error": (num / den) ** 0.5 if den else float("nan"), "worst_tensor": worst}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes, for any device")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    steps = args.steps or (2 if args.small else 10)
    device = torch.device(args.device)
    if device.type == "cuda":
        card = torch.cuda.get_device_name(device)
    else:
        card = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    results: list[dict[str, Any]] = []
    for name, (make, make_x, paths, keep_first) in workloads(args.small).items():
        torch.manual_seed(0)
        plain = make().to(device).train()
        x = make_x().to(device)
        free, twin, exact, exact_twin = (
            transform_to_momentumnet(plain, paths, keep_first_layer=keep_first, gamma=0.9, **kw)
            for kw in ({}, {"use_backprop": True}, {"exact": True},
                       {"exact": True, "use_backprop": True})
        )  # fmt: skip
        models = {
            "plain": plain,
            "checkpoint": checkpoint_every_block(plain, paths),
            "momentum_free": free,
            "momentum_exact": exact,
        }
        for amp in (False, True):
            row: dict[str, Any] = {"workload": name, "precision": "bf16" if amp else "fp32"}
            with warnings.catch_warnings(record=True) as caught:  # the float inverse's drift check
                warnings.simplefilter("always", InversionWarning)
                for variant, model in models.items():
                    row[variant] = measure(model, x, amp, steps)
                row["momentum_free"].update(gradient_error(twin, free, x, amp))
                row["momentum_exact"].update(gradient_error(exact_twin, exact, x, amp))
            row["momentum_free"]["drift_warned"] = any(
                issubclass(w.category, InversionWarning) for w in caught
            )
            results.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_small" if args.small else "gpu"
    meta = {"device": str(card), "torch": torch.__version__,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32, "steps": steps}  # fmt: skip
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = [
        f"Produced by `PYTHONPATH=src python benchmarks/gpu.py{' --small' if args.small else ''}` "
        f"on {card} (torch {torch.__version__}, TF32 cuDNN {meta['tf32_cudnn']}).",
        "",
        "| workload | precision | plain ms / MiB | checkpoint ms / MiB | memory-free ms / MiB "
        "| exact ms / MiB | memory-free grad error (worst tensor) | drift warned "
        "| exact grad error (worst tensor) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cells = [f"{r[v]['step_ms']:.0f} / {r[v]['peak_mib']:.0f}" for v in models]
        err, exact_err = r["momentum_free"], r["momentum_exact"]
        lines.append(f"| {r['workload']} | {r['precision']} | " + " | ".join(cells)
                     + f" | {err['grad_error']:.1e} ({err['worst_tensor']:.1e}) "
                     f"| {'yes' if err['drift_warned'] else 'no'} | {exact_err['grad_error']:.1e}"
                     f" ({exact_err['worst_tensor']:.1e}) |")  # fmt: skip
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
