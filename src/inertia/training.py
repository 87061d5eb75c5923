"""`fit(config)`: train a registered model on a dataset, with checkpoints, resume and metrics.

The loop is deterministic for a seed: each epoch's data order comes from a generator seeded by
``(seed, epoch)``, and the checkpoint written after each epoch holds the model, the optimizer, the
generator states and the metrics so far (tensors, numbers, strings and plain containers: it loads
with torch's safe unpickler). Resuming from it continues exactly where an uninterrupted run would
be; resuming with more epochs extends the run, its cosine schedule recomputed for the new total.
Ctrl-C (SIGINT) stops at the next step and keeps the last complete epoch's checkpoint.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import pickle
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ._errors import InertiaError
from .data import load_dataset
from .models import create_model
from .testing import LiveTensorMeter

__all__ = ["TrainConfig", "TrainResult", "fit"]

METRICS = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds",
           "samples_per_second")  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    """Settings of `fit` (and of ``inertia train``, one flag each)."""

    model: str = "momentum_resnet18_cifar"
    dataset: str = "digits"
    data_dir: str | None = None
    gamma: float = 0.9
    memory_free: bool = True  # save memory (each stack as `method` says); False: plain backprop
    method: str = "auto"  # "auto" (each stack's plan), "memory_free" or "checkpoint"
    checkpoint_kept: bool | None = None  # the first block of each ResNet stage (None: the plan's)
    checkpoint_stem: bool | None = None  # the ResNet stem (None: the plan's)
    exact: bool | None = None  # fixed point (None: exactly when memory-free), bit-exact backward
    amp: str | None = None  # "bf16" or "fp16"
    device: str = "auto"  # "auto": cuda when available
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    seed: int = 0
    out: str = "runs/train"
    resume: bool = False
    progress: bool = True


@dataclass
class TrainResult:
    """What `fit` returns: the per-epoch metrics, and the memory comparison of the same run."""

    metrics: list[dict[str, float]]
    test_accuracy: float
    # CPU: the live-tensor peak of one training step, this run's model against backprop's and
    # checkpointing every block's (`step_peaks`).
    step_bytes: dict[str, int] = field(default_factory=dict)
    gradient_bytes: int = 0  # of the weights' gradients, which every step's peak includes
    peak_cuda_bytes: int | None = None
    interrupted: bool = False
    out: Path = Path()
    is_main: bool = True  # False on the other ranks of a torchrun job (they print nothing)


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":  # no index given: this process's GPU in a torchrun job
        return torch.device("cuda", local_rank)
    return torch.device(name)


@dataclass
class _Ranks:
    """This process's place in a ``torchrun`` job (a single process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started: bool = False  # whether fit created the process group (and so destroys it)

    @classmethod
    def from_environment(cls, device_name: str) -> _Ranks:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as dist

        started = not dist.is_initialized()
        if started:
            cuda = device_name.startswith("cuda") or (
                device_name == "auto" and torch.cuda.is_available()
            )
            dist.init_process_group("nccl" if cuda else "gloo")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return cls(dist.get_rank(), dist.get_world_size(), local, started)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: float) -> list[float]:
        """Sums over the ranks (the values themselves in a single process)."""
        if self.world == 1:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.started:
            import torch.distributed as dist

            dist.destroy_process_group()


def build_model(config: TrainConfig, channels: int, num_classes: int) -> nn.Module:
    """The registered model, with its first convolution taking ``channels`` inputs."""
    options: dict[str, Any] = {
        name: value
        for name in ("checkpoint_kept", "checkpoint_stem", "exact")
        if (value := getattr(config, name)) is not None
    }
    if config.method != "auto":
        options["method"] = config.method
    model = create_model(
        config.model, num_classes=num_classes, gamma=config.gamma,
        use_backprop=not config.memory_free, **options,
    )  # fmt: skip
    conv1 = getattr(model, "conv1", None)
    if isinstance(conv1, nn.Conv2d) and conv1.in_channels != channels:
        # Same layer, another number of input channels (1 for the digits); the keys stay the same.
        model.conv1 = nn.Conv2d(
            channels, conv1.out_channels, conv1.kernel_size, conv1.stride,  # type: ignore[arg-type]
            conv1.padding, bias=conv1.bias is not None,  # type: ignore[arg-type]
        )  # fmt: skip
    return model


@contextmanager
def _sigint_flag() -> Iterator[dict[str, bool]]:
    """Turns SIGINT into a flag that the loop checks after each step."""
    flag = {"stop": False}
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: FrameType | None) -> None:
        flag["stop"] = True

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def _autocast(config: TrainConfig, device: torch.device) -> Any:
    if config.amp is None:
        return nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if config.amp not in dtypes:
        raise ValueError(f"amp={config.amp!r}; use 'bf16', 'fp16' or None.")
    return torch.autocast(device.type, dtype=dtypes[config.amp])


def _evaluate(
    model: nn.Module, loader: DataLoader[Any], device: torch.device, config: TrainConfig
) -> tuple[float, float]:
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with _autocast(config, device):
                logits = model(x)
            loss_sum += float(nn.functional.cross_entropy(logits.float(), y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
    return loss_sum / total, correct / total


#: The baselines of `step_peaks`: plain backprop, and checkpointing every block (the stacks' and
#: each stage's first), as users of ``torch.utils.checkpoint`` do.
BASELINES: dict[str, dict[str, Any]] = {
    "backprop": {"memory_free": False, "checkpoint_kept": False, "checkpoint_stem": False},
    "checkpointing": {"memory_free": True, "method": "checkpoint", "checkpoint_kept": True,
                      "checkpoint_stem": False, "exact": False},
}  # fmt: skip


def step_peaks(
    model: nn.Module, x: Tensor, y: Tensor, config: TrainConfig, channels: int, num_classes: int
) -> dict[str, int]:
    """The most bytes that one training step's tensors hold at once (`LiveTensorMeter`: forward,
    backward and the parameters' gradients, not the parameters), for a copy of ``model`` ("this
    run") and for the same weights trained the `BASELINES` ways."""
    models = {"this run": copy.deepcopy(model)}
    for name, changes in BASELINES.items():
        baseline = build_model(replace(config, **changes), channels, num_classes).to(x.device)
        baseline.load_state_dict(model.state_dict())
        models[name] = baseline
    peaks = {}
    for name, m in models.items():
        m.train().zero_grad(set_to_none=True)
        with LiveTensorMeter() as meter:
            with _autocast(config, x.device):
                loss = nn.functional.cross_entropy(m(x).float(), y)
            loss.backward()  # type: ignore[no-untyped-call]
        peaks[name] = meter.peak
    return peaks


def fit(config: TrainConfig) -> TrainResult:
    """Train ``config.model`` on ``config.dataset``; write metrics and checkpoints to ``out``.

    Files in ``config.out``: ``config.json``, ``metrics.csv`` and ``metrics.json`` (one row per
    epoch), ``checkpoint.pt`` (after each epoch, written atomically).

    Raises:
        InertiaError: The loss became NaN or infinite (the last good checkpoint is kept), or
            ``resume`` was asked without a checkpoint, with settings other than its own (more
            epochs aside), with fewer epochs than it holds, or of a checkpoint that carries
            pickled objects.
    """
    ranks = _Ranks.from_environment(config.device)
    try:
        return _fit(config, ranks)
    finally:
        ranks.close()


#: Settings that a resumed run may change: they do not alter what it computes, except ``epochs``,
#: which may grow (`_extend_schedule`).
_RESUMABLE = frozenset({"resume", "progress", "out", "device", "epochs"})


def _check_resumed(config: TrainConfig, saved: dict[str, Any], path: Path) -> None:
    """Refuses to resume a run with settings other than those its checkpoint was trained with."""
    changed = {
        name: (saved[name], value)
        for name, value in asdict(config).items()
        if name not in _RESUMABLE and name in saved and saved[name] != value
    }
    if changed:
        diff = ", ".join(f"{k} {old!r} (now {new!r})" for k, (old, new) in changed.items())
        raise InertiaError(
            f"--resume: {path} was trained with other settings: {diff}. Repeat the first run's "
            f"flags (they are in {path.parent / 'config.json'}), or train into a new --out."
        )


def _load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """The checkpoint at ``path``, loaded with torch's safe unpickler (tensors, numbers, strings
    and plain containers only: what `fit` writes), which runs no code from the file."""
    try:
        state: dict[str, Any] = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0]
        raise InertiaError(
            f"--resume: {path} holds objects other than tensors, numbers, strings and plain "
            "containers, which inertia train never writes, so it is not loaded: unpickling them "
            f"could run any code ({reason}). Train into a new --out."
        ) from err
    return state


def _extend_schedule(sched: torch.optim.lr_scheduler.CosineAnnealingLR, epochs: int) -> None:
    """Make ``sched`` anneal over ``epochs`` in all, from the epoch it is at: its learning rates
    set to the cosine's value there, from which its recursive steps follow the new cosine."""
    sched.T_max = epochs
    t, floor = sched.last_epoch, sched.eta_min
    for group, base in zip(sched.optimizer.param_groups, sched.base_lrs, strict=True):
        group["lr"] = floor + (base - floor) * (1 + math.cos(math.pi * t / epochs)) / 2
    sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]


def _fit(config: TrainConfig, ranks: _Ranks) -> TrainResult:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    device = _device(config.device, ranks.local_rank)
    if config.batch_size % ranks.world:
        raise InertiaError(
            f"--batch-size {config.batch_size} is the global batch: it must be divisible by the "
            f"{ranks.world} processes of this torchrun job."
        )
    torch.manual_seed(config.seed)
    split = load_dataset(config.dataset, data_dir=config.data_dir, seed=config.seed)
    model = build_model(config, split.channels, split.num_classes).to(device)
    opt = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs)
    scaler = torch.amp.grad_scaler.GradScaler(device.type, enabled=config.amp == "fp16")
    metrics: list[dict[str, float]] = []
    start_epoch = 0
    ckpt_path = out / "checkpoint.pt"
    if config.resume:
        if not ckpt_path.exists():
            raise InertiaError(f"--resume: no checkpoint at {ckpt_path}; run without --resume.")
        state = _load_checkpoint(ckpt_path, device)
        _check_resumed(config, state["config"], ckpt_path)
        start_epoch, trained_for = state["epoch"] + 1, state["config"]["epochs"]
        if config.epochs < start_epoch:
            raise InertiaError(
                f"--resume: {ckpt_path} holds {start_epoch} trained epochs, more than --epochs "
                f"{config.epochs}; pass --epochs {trained_for} to finish that run, or more to "
                "extend it."
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        metrics = state["metrics"]
        if config.epochs != trained_for:
            _extend_schedule(sched, config.epochs)
            if ranks.is_main:
                print(
                    f"inertia train: --resume extends the run from {trained_for} to "
                    f"{config.epochs} epochs: the cosine learning-rate schedule is recomputed "
                    f"for {config.epochs} epochs, from epoch {start_epoch + 1} on (learning rate "
                    f"{opt.param_groups[0]['lr']:.4g}).",
                    file=sys.stderr,
                )
    if ranks.is_main:
        (out / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    train_model: nn.Module = model
    if ranks.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model)
    test_loader = DataLoader(split.test, batch_size=256)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    interrupted = False
    with _sigint_flag() as flag:
        for epoch in range(start_epoch, config.epochs):
            loader = _train_loader(split.train, config, ranks, epoch)
            model.train()
            t0, seen, correct, loss_sum = time.perf_counter(), 0, 0, 0.0
            for step, (x, y) in enumerate(loader):
                x, y = x.to(device), y.to(device)
                with _autocast(config, device):
                    logits = train_model(x)
                loss = nn.functional.cross_entropy(logits.float(), y)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise InertiaError(
                        f"the loss became {value} at epoch {epoch + 1}, step {step + 1}; "
                        f"stopped. The last good checkpoint is kept in {ckpt_path} (epoch "
                        f"{epoch}). Lower --lr, or try --backprop or a larger --gamma if the "
                        "memory-free run warned about inversion drift."
                    )
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
                scaler.step(opt)
                scaler.update()
                seen += len(y)
                loss_sum += value * len(y)
                correct += int((logits.argmax(1) == y).sum())
                if config.progress and ranks.is_main:
                    _progress(epoch, config.epochs, step + 1, len(loader), loss_sum / seen,
                              correct / seen, seen / (time.perf_counter() - t0))  # fmt: skip
                if flag["stop"]:
                    interrupted = True
                    break
            if interrupted:
                break
            sched.step()
            seconds = time.perf_counter() - t0
            total, right, loss_total = ranks.sum(seen, correct, loss_sum)  # over the ranks
            test_loss, test_acc = _evaluate(model, test_loader, device, config)
            metrics.append({
                "epoch": epoch + 1, "train_loss": loss_total / total,
                "train_accuracy": right / total, "test_loss": test_loss,
                "test_accuracy": test_acc, "seconds": seconds,
                "samples_per_second": total / seconds,
            })  # fmt: skip
            if not ranks.is_main:
                continue  # rank 0 writes the metrics and the checkpoint
            if config.progress:
                print(f" | held-out {test_acc:.1%}", file=sys.stderr, flush=True)
            _write_metrics(out, metrics)
            _save_atomic({
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                "rng": torch.get_rng_state(), "epoch": epoch, "metrics": metrics,
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "config": asdict(config),
            }, ckpt_path)  # fmt: skip
    x, y = next(iter(DataLoader(split.train, batch_size=config.batch_size)))
    result = TrainResult(
        metrics=metrics,
        test_accuracy=metrics[-1]["test_accuracy"] if metrics else float("nan"),
        interrupted=interrupted,
        out=out,
        is_main=ranks.is_main,
    )
    if device.type == "cuda":
        result.peak_cuda_bytes = torch.cuda.max_memory_allocated(device)
    else:
        result.step_bytes = step_peaks(
            model, x.to(device), y.to(device), config, split.channels, split.num_classes
        )
        result.gradient_bytes = sum(
            p.numel() * p.element_size() for p in model.parameters() if p.requires_grad
        )
    return result


def _train_loader(
    data: Dataset[Any], config: TrainConfig, ranks: _Ranks, epoch: int
) -> DataLoader[Any]:
    """Epoch ``epoch``'s batches: a fixed order for the seed; in a torchrun job, this rank's share
    of the global batch ``config.batch_size``."""
    batch = config.batch_size // ranks.world
    if ranks.world == 1:
        order = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        return DataLoader(data, batch_size=batch, shuffle=True, generator=order, drop_last=True)
    sampler: DistributedSampler[Any] = DistributedSampler(
        data, ranks.world, ranks.rank, shuffle=True, seed=config.seed, drop_last=True
    )
    sampler.set_epoch(epoch)
    return DataLoader(data, batch_size=batch, sampler=sampler, drop_last=True)


def _progress(epoch: int, epochs: int, step: int, steps: int, loss: float, acc: float,
              rate: float) -> None:  # fmt: skip
    done = 24 * step // steps
    bar = "#" * done + "." * (24 - done)
    print(f"\repoch {epoch + 1}/{epochs} [{bar}] loss {loss:.3f} acc {acc:.1%} "
          f"{rate:.0f} samples/s", end="", file=sys.stderr, flush=True)  # fmt: skip


def _write_metrics(out: Path, metrics: list[dict[str, float]]) -> None:
    with (out / "metrics.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=METRICS)
        writer.writeheader()
        writer.writerows(metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
