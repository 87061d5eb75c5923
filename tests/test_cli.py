"""The inertia command: train (resume after SIGINT, NaN stop, data errors), bench, plot."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from inertia import InertiaError, register_model
from inertia.cli import main
from inertia.models import _registry
from inertia.training import TrainConfig, fit

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["train", "--dataset", "synthetic", "--model", "momentum_resnet18_cifar", "--seed", "3"]


def run(args: list[str], **kwargs: Any) -> subprocess.Popen[str]:
    # One thread each: tests run two trainings at once on CI's 2 cores, and two processes of two
    # OpenMP threads each slowed an epoch from seconds to minutes.
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "inertia", *args], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs,
    )  # fmt: skip


def test_train_writes_metrics_and_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    status = main([*TRAIN, "--epochs", "2", "--batch-size", "32", "--out", str(out)])
    assert status == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("inertia train: momentum_resnet18_cifar on synthetic, 2/2 epochs")
    assert "one step holds" in summary
    assert "x backprop's" in summary
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[-1]["test_accuracy"]) > 0.5  # 4 classes: well above chance
    assert (out / "config.json").exists()
    assert (out / "checkpoint.pt").exists()
    assert main(["plot", str(out)]) == 0
    assert (out / "learning_curves.png").exists() or list(out.glob("*.png"))


def test_sigint_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    """Ctrl-C in epoch 2 keeps epoch 1's checkpoint; --resume then ends exactly where an
    uninterrupted run ends: same weights, buffers and optimizer state, bit for bit."""
    args = [*TRAIN, "--epochs", "3", "--batch-size", "8", "--no-progress"]
    full = run([*args, "--out", str(tmp_path / "full")])
    part_dir = tmp_path / "part"
    part = run([*args, "--out", str(part_dir)])
    metrics = part_dir / "metrics.csv"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and (part_dir / "checkpoint.pt").exists()):
        assert part.poll() is None, part.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    epoch_seconds = float(next(csv.DictReader(metrics.read_text().splitlines()))["seconds"])
    # Into epoch 2, early: at 0.4 epochs the signal once came after epoch 2 had ended (epoch 1 had
    # run slow on a busy machine).
    time.sleep(0.1 * epoch_seconds)
    part.send_signal(signal.SIGINT)
    out, err = part.communicate(timeout=120)
    assert part.returncode == 130, err
    assert "interrupted, checkpoint kept" in out
    state = torch.load(part_dir / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 0  # the last complete epoch: 1
    resumed = run([*args, "--out", str(part_dir), "--resume"])
    for proc in (resumed, full):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(part_dir / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for i, buf in a["optimizer"]["state"].items():
        assert torch.equal(buf["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])
    for ma, mb in zip(a["metrics"], b["metrics"], strict=True):
        assert ma["train_loss"] == mb["train_loss"]
        assert ma["test_accuracy"] == mb["test_accuracy"]


def nan_after_one_epoch_test_model(*, num_classes: int, **_: Any) -> nn.Module:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3 * 8 * 8, num_classes)
            self.calls = 0

        def forward(self, x: Tensor) -> Tensor:
            self.calls += 1 if self.training else 0
            out = self.fc(x.flatten(1))
            return out * float("nan") if self.calls > 12 else out

    return Net()


@pytest.fixture
def nan_model() -> Iterator[None]:
    """Registered for one test only: other tests iterate over the registry."""
    register_model(nan_after_one_epoch_test_model)
    yield
    del _registry._MODELS["nan_after_one_epoch_test_model"]


@pytest.mark.usefixtures("nan_model")
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    config = TrainConfig(
        model="nan_after_one_epoch_test_model", dataset="synthetic", epochs=3, batch_size=32,
        out=str(tmp_path), progress=False,
    )  # fmt: skip
    with pytest.raises(InertiaError, match=r"loss became nan at epoch 2.*last good checkpoint"):
        fit(config)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["epoch"] == 0


def test_missing_data_dir_names_the_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--out",
                   str(tmp_path / "run")])  # fmt: skip
    assert status == 1
    err = capsys.readouterr().err
    assert "inertia train: error:" in err
    assert "cifar-10-batches-py" in err


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    """A resumed run trains on with the checkpoint's optimizer and schedule: other settings would
    silently make it a different run."""
    config = TrainConfig(dataset="synthetic", epochs=1, batch_size=32, exact=False,
                         out=str(tmp_path), progress=False)  # fmt: skip
    fit(config)
    for other in ({"batch_size": 16}, {"exact": None}, {"lr": 0.1}):
        with pytest.raises(InertiaError, match=f"{next(iter(other))} .*Repeat the first run's"):
            fit(replace(config, resume=True, **other))
    assert fit(replace(config, resume=True, progress=True)).metrics  # nothing left to train


def test_resume_with_more_epochs_extends_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--resume with a larger --epochs trains on, the cosine schedule recomputed for the new total
    from where the run stopped (and says so); fewer epochs than trained is refused."""
    config = TrainConfig(dataset="synthetic", epochs=1, batch_size=32, out=str(tmp_path),
                         progress=False)  # fmt: skip
    fit(config)
    capsys.readouterr()
    result = fit(replace(config, epochs=3, resume=True))
    assert [int(m["epoch"]) for m in result.metrics] == [1, 2, 3]
    assert "extends the run from 1 to 3 epochs" in capsys.readouterr().err
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["config"]["epochs"] == 3
    assert state["scheduler"]["T_max"] == 3
    # After epoch 3 of 3 the cosine is at its end; the run's rate before it was the new cosine's.
    assert state["scheduler"]["_last_lr"][0] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(InertiaError, match="holds 3 trained epochs, more than --epochs 2"):
        fit(replace(config, epochs=2, resume=True))


def test_extended_schedule_is_the_cosine_of_the_new_total() -> None:
    from inertia.training import _extend_schedule

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    for _ in range(2):
        opt.step()
        sched.step()
    _extend_schedule(sched, 10)
    rates = []
    for _ in range(8):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.05 * (1 + math.cos(math.pi * t / 10)) for t in range(2, 10)]
    assert rates == pytest.approx(expected, rel=1e-12)


class Payload:
    """Any object in a checkpoint: unpickling it may run code (here it would not)."""


def test_resume_refuses_a_checkpoint_with_pickled_objects(tmp_path: Path) -> None:
    config = TrainConfig(dataset="synthetic", epochs=1, batch_size=32, out=str(tmp_path),
                         progress=False)  # fmt: skip
    fit(config)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # what fit writes loads
    torch.save({**state, "extra": Payload()}, tmp_path / "checkpoint.pt")
    with pytest.raises(InertiaError, match=r"holds objects other than tensors.*could run any code"):
        fit(replace(config, epochs=2, resume=True))


@pytest.mark.parametrize(
    ("argv", "fix"),
    [
        (["train", "--dataset", "nope"], "--dataset 'nope': choose one of digits, synthetic"),
        (["train", "--gamma", "1.5"], "--gamma 1.5: the momentum must be in [0, 1]"),
        (["train", "--model", "nope"], "--model 'nope' is not a registered model; choose one of"),
        (["train", "--epochs", "-1"], "--epochs -1: it must be 0 or more"),
        (["train", "--batch-size", "0"], "--batch-size 0: it must be 1 or more"),
        (["bench", "--depths", "0", "--quick"], "--depths 0: each must be 1 or more"),
        (["bench", "--batches", "0", "--quick"], "--batches 0: each must be 1 or more"),
        (["experiment", "nope"], "unknown experiment 'nope'; choose one of"),
        (
            ["experiment", "llm", "--part", "nope"],
            "--part nope: experiment 'llm' has no part 'nope'; choose from sweep, finetune.",
        ),
        (
            ["experiment", "linear-maps", "--part", "sweep"],
            "--part sweep: experiment 'linear-maps' has no parts to choose; it runs whole.",
        ),
    ],
)
def test_bad_input_is_one_line_and_status_two(
    argv: list[str], fix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"inertia {argv[0]}: error: {fix}"), lines[0]


def test_resume_without_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*TRAIN, "--resume", "--out", str(tmp_path)]) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_bench_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "--quick", "--depths", "4", "16", "--batches", "8", "32"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("inertia bench: mlp batch 32, depth 16, against plain ")
    assert "inertia exact (the default) " in summary
    assert "checkpointing " in summary
    assert "; floors of the step: any memory-free stack " in summary
    rows = list(csv.DictReader((tmp_path / "bench.csv").read_text().splitlines()))
    floors = [r for r in rows if r["variant"] in ("checkpoint_whole", "floor")]
    assert len(floors) == 2 * 2 * 2  # timed only, at each depth and batch
    assert all(r["peak_saved_bytes"] == "nan" and float(r["step_ms"]) > 0 for r in floors)
    assert {r["case"] for r in rows} == {"mlp batch 8", "mlp batch 32"}
    variants = {r["variant"] for r in rows}
    assert {"plain", "checkpoint", "momentum_backprop", "momentum_free"} <= variants
    assert ("momentumnet_0.10" in variants) == bool(importlib.util.find_spec("momentumnet"))
    assert "| mlp batch 32 (16) |" in (tmp_path / "bench.md").read_text()
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["bench_batch32.png", "bench_batch8.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in tmp_path.glob("*.png"))
    assert main(["plot", str(tmp_path / "bench.csv"), "--out", str(tmp_path / "again")]) == 0


@pytest.mark.skipif(sys.platform != "linux", reason="resident peaks need Linux's /proc")
def test_bench_table_names_what_it_measured(tmp_path: Path) -> None:
    """bench.md's command and description are those of the run, batch sweep included."""
    args = ["bench", "--depths", "2", "--batches", "4", "8", "--variants", "plain",
            "momentum_free", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    table = (tmp_path / "bench.md").read_text()
    assert "`inertia bench --depths 2 --batches 4 8 --variants plain momentum_free`" in table
    assert "batches 4, 8," in table


def test_bench_true_peak(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--true-peak: one fresh process per depth and variant, beside the bytes saved."""
    args = ["bench", "--quick", "--depths", "4", "--variants", "plain", "momentum_free"]
    assert main([*args, "--true-peak", "--out", str(tmp_path)]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "inertia float " in summary
    assert "saved, true peak" in summary
    rows = list(csv.DictReader((tmp_path / "bench.csv").read_text().splitlines()))
    assert [r["variant"] for r in rows] == ["plain", "momentum_free"]
    assert all(float(r["true_peak_bytes"]) >= 0 for r in rows)
    assert all(float(r["true_peak_accumulate_bytes"]) >= 0 for r in rows)
    assert "### True peak of a training step" in (tmp_path / "bench.md").read_text()


def test_bench_variants_must_name_the_compared_pair(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--variants", "plain", "checkpoint"]) == 2
    assert "name both" in capsys.readouterr().err


def test_list_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--list-models"]) == 0
    assert "momentum_resnet18_cifar" in capsys.readouterr().out.split()


def test_experiment_list_and_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experiment", "--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert "crossing" in listed
    assert "ode-limit" in listed
    out = tmp_path / "exp"
    status = main(["experiment", "linear-maps", "--quick", "--out", str(out)])
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert status == 0, summary
    assert summary.startswith("inertia experiment linear-maps: claim holds: ")
    assert {p.name for p in out.iterdir()} >= {"linear-maps.csv", "linear-maps.md"}
    assert "`inertia experiment linear-maps --quick --out " in (out / "linear-maps.md").read_text()
    assert main(["experiment", "nope"]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err


def test_experiment_part_reaches_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--part`` becomes `ExperimentConfig.parts` and is written in the command line of the
    result (the experiment itself replaced by one that records its config)."""
    from inertia.experiments import EXPERIMENTS, ExperimentConfig, ExperimentResult

    seen: list[ExperimentConfig] = []

    def run(config: ExperimentConfig) -> ExperimentResult:
        seen.append(config)
        return ExperimentResult("llm", "claim", "check", True, "summary", "setup", ("a",), [(1,)])

    parts = ("sweep", "finetune")
    fake = replace(EXPERIMENTS["llm"], run=run, plot=lambda result, fig: None, parts=parts)
    monkeypatch.setitem(EXPERIMENTS, "llm", fake)
    argv = ["experiment", "llm", "--quick", "--part", "sweep", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert [c.parts for c in seen] == [("sweep",)]
    md = (tmp_path / "llm.md").read_text()
    assert f"`inertia experiment llm --quick --part sweep --out {tmp_path}`" in md
    assert main([*argv[:3], "--part", "finetune", "sweep", *argv[-2:]]) == 0
    assert seen[-1].parts == ("finetune", "sweep")


def test_train_exact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from inertia import MomentumNet
    from inertia.training import TrainConfig, build_model

    for exact, want in ((None, True), (True, True), (False, False)):  # None: exact when memory-free
        config = TrainConfig(exact=exact, method="memory_free")
        model = build_model(config, channels=1, num_classes=4)
        stacks = [m for m in model.modules() if isinstance(m, MomentumNet)]
        assert len(stacks) == 4
        assert all(m.exact == want for m in stacks)
    model = build_model(TrainConfig(memory_free=False), channels=1, num_classes=4)
    assert not any(m.exact for m in model.modules() if isinstance(m, MomentumNet))
    out = tmp_path / "run"
    assert main([*TRAIN, "--exact", "--epochs", "1", "--batch-size", "32", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["exact"] is True
    assert main([*TRAIN, "--float", "--epochs", "1", "--batch-size", "32", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["exact"] is False
    with pytest.raises(SystemExit):
        main([*TRAIN, "--float", "--exact"])
