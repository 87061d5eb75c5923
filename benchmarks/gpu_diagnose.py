"""Why the GPU targets of ``gpu.py`` are missed: three diagnostics, on the same workloads.

1. **Gradient-error floor** (ResNet-101, fp32, TF32 at PyTorch's defaults): the backprop twin
   against itself (two runs, same weights, batch and buffers) beside exact and float memory-free
   against the twin, with cuDNN's default algorithms and then with deterministic ones. What the
   twin shows against itself is the run-to-run noise of the GPU's kernels, a floor under any
   comparison.
2. **TF32 against float64 truth** (the same ResNet, exact mode): memory-free against its twin,
   and each against the float64 gradients of the same model, with TF32 convolutions on and off.
3. **Memory over the step** (24-layer encoder, fp32): ``torch.cuda.memory_allocated`` and the peak
   so far, read as each block starts (in the forward, and in the backward's recomputation) for
   checkpointing and the memory-free modes; and the true peak of a step when ``.grad`` is already
   allocated (gradient accumulation).

    PYTHONPATH=src python benchmarks/gpu_diagnose.py --commit $(git rev-parse --short HEAD)
    PYTHONPATH=src python benchmarks/gpu_diagnose.py --small --device cpu   # the test suite

Writes ``gpu_diagnose.json`` and ``gpu_diagnose.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

# The workloads and measurements of gpu.py, beside this file (benchmarks/ is not a package).
_spec = importlib.util.spec_from_file_location("gpu", Path(__file__).with_name("gpu.py"))
assert _spec is not None
assert _spec.loader is not None
gpu = sys.modules["gpu"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu)


def error_floor(wl: Any, device: torch.device) -> list[dict[str, Any]]:
    """Twin against twin, exact and float against the twin; default and deterministic cuDNN."""
    rows = []
    torch.manual_seed(1)
    batch = wl.batch(device)
    models = {v: wl.build(v).to(device).train() for v in ("momentum_exact", "momentum_float")}
    twins = {v: wl.build(v, use_backprop=True).to(device).train() for v in models}
    for deterministic in (False, True):
        torch.backends.cudnn.deterministic = deterministic
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for variant, model in models.items():
                twin = twins[variant]
                other = copy.deepcopy(twin)
                row = {"deterministic": deterministic, "variant": variant}
                row["twin_vs_twin"] = gpu.gradient_error(twin, other, wl, batch, amp=False)
                row["free_vs_twin"] = gpu.gradient_error(twin, model, wl, batch, amp=False)
                rows.append(row)
                del other
        for row in rows[-2:]:
            row["warnings"] = sorted({str(w.message)[:120] for w in caught})
    torch.backends.cudnn.deterministic = False
    torch.use_deterministic_algorithms(False)
    return rows


def tf32_effect(wl: Any, device: torch.device) -> list[dict[str, Any]]:
    """Exact memory-free and its twin against float64 truth, with TF32 convolutions on and off."""
    torch.manual_seed(1)
    batch = wl.batch(device)
    model = wl.build("momentum_exact").to(device).train()
    twin = wl.build("momentum_exact", use_backprop=True).to(device).train()
    truth = wl.build("momentum_exact", use_backprop=True).to(device, torch.float64).train()
    rows = []
    for tf32 in (True, False):
        torch.backends.cudnn.allow_tf32 = tf32
        row: dict[str, Any] = {"tf32_cudnn": tf32}
        row["free_vs_twin"] = gpu.gradient_error(twin, model, wl, batch, amp=False)
        truth.load_state_dict(model.state_dict())  # the same weights and buffers, in float64
        torch.manual_seed(0)
        gpu.train_step(truth, wl, batch.double(), amp=False)
        grads = {n: p.grad for n, p in truth.named_parameters() if p.grad is not None}
        row["twin_vs_float64"] = gpu._errors(twin, grads)
        row["free_vs_float64"] = gpu._errors(model, grads)
        rows.append(row)
    torch.backends.cudnn.allow_tf32 = True
    del model, twin, truth
    gpu.free(device)
    return rows


def timeline(wl: Any, variant: str, device: torch.device) -> dict[str, Any]:
    """Allocated and peak MiB as each block starts, over one step; and the accumulation peak."""
    model = wl.build(variant).to(device).train()
    torch.manual_seed(1)
    batch = wl.batch(device)
    gpu.train_step(model, wl, batch, amp=False)  # warm-up
    model.zero_grad(set_to_none=True)
    stack = model.get_submodule(wl.paths[0])
    points: list[tuple[int, float, float]] = []

    def record(index: int) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            # The peak since the previous point: it belongs to the interval that ends here.
            points.append((index, _mib(_allocated(device)),
                           _mib(_peak(device))))  # fmt: skip
            _reset(device)

        return hook

    # Indexing a converted stack gives its blocks; a checkpointed block wraps the original.
    blocks = [getattr(stack[i], "block", stack[i]) for i in range(len(stack))]
    handles = [b.register_forward_pre_hook(record(i)) for i, b in enumerate(blocks)]
    _reset(device)
    base = _allocated(device)
    gpu.train_step(model, wl, batch, amp=False)
    gpu.synchronize(device)
    points.append((-1, _mib(_allocated(device)), _mib(_peak(device))))  # the step's end
    peak = max(p for _, _, p in points)
    for h in handles:
        h.remove()
    # Gradient accumulation: .grad allocated before the step, as after a first micro-batch.
    _reset(device)
    base_acc = _allocated(device)
    with torch.autocast(device.type, enabled=False):
        wl.loss(model, batch).backward()
    gpu.synchronize(device)
    peak_acc = _peak(device)
    row = {
        "variant": variant,
        "base_mib": _mib(base),
        "peak_mib": peak,
        "points": points,
        "accumulate_base_mib": _mib(base_acc),
        "accumulate_peak_mib": _mib(peak_acc),
        "grads_mib": _mib(sum(p.numel() * p.element_size() for p in model.parameters())),
    }
    del model
    gpu.free(device)
    return row


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def _reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _mib(n: int) -> float:
    return round(n / 2**20, 1)


def markdown(
    meta: dict[str, Any],
    floor: list[dict[str, Any]],
    tf32: list[dict[str, Any]],
    lines_: list[dict[str, Any]],
) -> str:
    out = [
        f"Produced by `{meta['command']}` on {meta['device']} (torch {meta['torch']}, commit "
        f"{meta['commit']}). TF32: matmul {meta['tf32_matmul']}, cuDNN {meta['tf32_cudnn']}.",
    ]
    if floor:
        out += [
            "",
            f"## Gradient-error floor: {meta['floor_workload']}, fp32",
            "",
            "Global relative error of parameter gradients (worst tensor). *twin vs twin*: the "
            "backprop twin run twice on the same weights, batch and buffers.",
            "",
            "| cuDNN algorithms | variant | twin vs twin | memory-free vs twin |",
            "|---|---|---|---|",
        ]
    for r in floor:
        tt, ft = r["twin_vs_twin"], r["free_vs_twin"]
        out.append(
            f"| {'deterministic' if r['deterministic'] else 'default'} | {r['variant']} | "
            f"{tt['grad_error']:.1e} ({tt['worst_tensor']:.1e}) | "
            f"{ft['grad_error']:.1e} ({ft['worst_tensor']:.1e}) |"
        )
    if tf32:
        out += [
            "",
            f"## TF32 and float64 truth: {meta['floor_workload']}, exact mode",
            "",
            "Global relative error of parameter gradients (worst tensor) against the float64 "
            "gradients of the same model (exact backprop twin in float64, same weights and "
            "buffers).",
            "",
            "| TF32 convolutions | memory-free vs twin | twin vs float64 "
            "| memory-free vs float64 |",
            "|---|---|---|---|",
        ]
    for r in tf32:
        cells = [r["free_vs_twin"], r["twin_vs_float64"], r["free_vs_float64"]]
        out.append(
            f"| {'on' if r['tf32_cudnn'] else 'off'} | "
            + " | ".join(f"{c['grad_error']:.1e} ({c['worst_tensor']:.1e})" for c in cells)
            + " |"
        )
    if lines_:
        out += [
            "",
            f"## Memory over one step: {meta['timeline_workload']}, fp32",
            "",
            "MiB above the weights and the batch. *Reached*: the interval of the step in which "
            "its peak was reached (each block's forward call, or its recomputation and pullback "
            "in the backward). *At block i*: allocated when block i starts in the backward (its "
            "recomputation); the block-0 column is where the memory-free modes hold every "
            "parameter gradient. *Accumulation*: the step's peak with `.grad` already allocated.",
            "",
            "| variant | step peak | reached | at last block (backward) | at block 0 (backward) "
            "| accumulation peak | parameter gradients |",
            "|---|---|---|---|---|---|---|",
        ]
    for r in lines_:
        points = r["points"]
        n = max(i for i, _, _ in points) + 1
        backward = points[n:]  # forward first, then the backward's recomputations, then the end
        first = next((a for i, a, _ in backward if i == 0), float("nan"))
        last = next((a for i, a, _ in backward if i == n - 1), float("nan"))
        out.append(
            f"| {r['variant']} | {r['peak_mib'] - r['base_mib']:,.0f} | {_reached(points)} | "
            f"{last - r['base_mib']:,.0f} | {first - r['base_mib']:,.0f} | "
            f"{r['accumulate_peak_mib'] - r['accumulate_base_mib']:,.0f} | {r['grads_mib']:,.0f} |"
        )
    return "\n".join(out) + "\n"


def _reached(points: list[tuple[int, float, float]]) -> str:
    """Where the step's peak was reached: the interval before the point that reports it."""
    at = max(range(len(points)), key=lambda k: points[k][2])
    n = max(i for i, _, _ in points) + 1
    if at == 0:
        return "before block 0 (forward)"
    before = points[at - 1][0]
    if at - 1 < n:
        return f"block {before} (forward)"
    return f"block {before} (backward)" if points[at - 1][0] >= 0 else "after the stack"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", default="floor,tf32,timeline", help="comma-separated")
    parser.add_argument("--stem", default=None, help="results file names")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    parts = set(args.parts.split(","))
    loads = {wl.name.rstrip("0123456789"): wl for wl in gpu.workloads(args.small)}
    floor = error_floor(loads["resnet"], device) if "floor" in parts else []
    print(json.dumps(floor), file=sys.stderr, flush=True)
    tf32 = tf32_effect(loads["resnet"], device) if "tf32" in parts else []
    print(json.dumps(tf32), file=sys.stderr, flush=True)
    timelines = []
    for variant in ("checkpoint", "momentum_exact", "momentum_float", "plain"):
        if "timeline" in parts:
            timelines.append(timeline(loads["encoder"], variant, device))
            print(json.dumps(timelines[-1])[:300], file=sys.stderr, flush=True)
    shown = list(argv if argv is not None else sys.argv[1:])
    for flag in ("--out", "--commit"):  # where it ran, not what it measured
        if flag in shown:
            del shown[shown.index(flag) : shown.index(flag) + 2]
    meta = {
        "command": " ".join(["PYTHONPATH=src python benchmarks/gpu_diagnose.py", *shown]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "commit": args.commit,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "floor_workload": loads["resnet"].describe,
        "timeline_workload": loads["encoder"].describe,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("gpu_diagnose_small" if args.small else "gpu_diagnose")
    results = {"meta": meta, "floor": floor, "tf32": tf32, "timelines": timelines}
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(meta, floor, tf32, timelines))
    print((args.out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
