"""Figures from training runs and benchmark CSVs: written as PNG and PDF, with the right errors."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from inertia import InertiaError
from inertia.bench import BenchRow, write_csv
from inertia.plots import plot_bench, plot_training

pytest.importorskip("matplotlib")

METRICS_HEADER = (
    "epoch,train_loss,train_accuracy,test_loss,test_accuracy,seconds,samples_per_second"
)


def assert_figures(paths: list[Path], *expected: Path) -> None:
    """``expected`` are stems: each written as a non-trivial PNG and PDF, nothing else."""
    assert paths == [p.with_suffix(s) for p in expected for s in (".png", ".pdf")]
    for path in paths:
        data = path.read_bytes()
        if path.suffix == ".png":
            assert data.startswith(b"\x89PNG\r\n\x1a\n")
            assert len(data) > 5_000
        else:
            assert data.startswith(b"%PDF")
            assert len(data) > 1_000


def write_metrics(run_dir: Path, epochs: int, percent: bool = False) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [METRICS_HEADER]
    for e in range(1, epochs + 1):
        train, test = 2.3 / e, 2.4 / e**0.8
        acc = (1 - 0.9 / e) * (100 if percent else 1)
        lines.append(f"{e},{train:.4f},{acc:.4f},{test:.4f},{acc - 0.05:.4f},12.5,4000.0")
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("with_config", [True, False])
@pytest.mark.parametrize("epochs", [1, 6])
def test_plot_training(tmp_path: Path, with_config: bool, epochs: int) -> None:
    run_dir = tmp_path / "run"
    write_metrics(run_dir, epochs)
    if with_config:
        config = {"model": "resnet18_cifar", "gamma": 0.9, "memory_free": True, "lr": 0.1}
        (run_dir / "config.json").write_text(json.dumps(config))
    assert_figures(plot_training(run_dir), run_dir / "learning_curves")


def test_plot_training_out_dir(tmp_path: Path) -> None:
    write_metrics(tmp_path / "run", 3, percent=True)
    out = tmp_path / "figures" / "nested"
    assert_figures(plot_training(str(tmp_path / "run"), str(out)), out / "learning_curves")
    assert not (tmp_path / "run" / "learning_curves.png").exists()


def test_plot_training_missing_metrics(tmp_path: Path) -> None:
    with pytest.raises(InertiaError, match=r"metrics\.csv.*inertia train --out"):
        plot_training(tmp_path)


def test_plot_training_bad_metrics(tmp_path: Path) -> None:
    (tmp_path / "metrics.csv").write_text(METRICS_HEADER + "\n")
    with pytest.raises(InertiaError, match="a row per epoch"):
        plot_training(tmp_path)
    (tmp_path / "metrics.csv").write_text("epoch,train_loss\n1,2.3\n")
    with pytest.raises(InertiaError, match=r"needs the columns epoch, train_loss, train_accuracy"):
        plot_training(tmp_path)


def bench_rows(
    case: str, depths: list[int], variants: list[str], timed: bool = True
) -> list[BenchRow]:
    """Hand-made rows: plain and checkpoint grow with depth, memory-free stays flat."""
    rows = []
    for depth in depths:
        plain = depth * 1.6e6
        for i, variant in enumerate(variants):
            peak = 2.6e6 if variant.startswith("momentum_free") else plain / (1 + 2 * i)
            ms = 10.0 * depth * (1 + 0.2 * i) if timed else math.nan
            ratio = 1 + 0.2 * i if timed else math.nan
            rows.append(
                BenchRow(
                    variant,
                    case,
                    depth,
                    int(peak) // 2,
                    int(peak),
                    ms,
                    0.9 * ms,
                    1.1 * ms,
                    time_ratio=ratio,
                    memory_ratio=peak / plain,
                )
            )
    return rows


SWEEP = ["plain", "checkpoint", "momentum_backprop", "momentum_free"]
MODELS = ["plain", "checkpoint", "momentum_free", "momentum_free_ckpt_stem_first"]


def test_plot_bench_depth_sweep(tmp_path: Path) -> None:
    csv_path = tmp_path / "memory_vs_depth.csv"
    write_csv(bench_rows("mlp", [4, 8, 16, 32], SWEEP), csv_path)
    pyplot_loaded = "matplotlib.pyplot" in sys.modules
    assert_figures(plot_bench(csv_path), tmp_path / "memory_vs_depth")
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_loaded  # the caller's state untouched


def test_plot_bench_models(tmp_path: Path) -> None:
    csv_path = tmp_path / "models.csv"
    rows = bench_rows("resnet50", [16], MODELS) + bench_rows("transformer12", [12], MODELS[:3])
    write_csv(rows, csv_path)
    out = tmp_path / "out"
    assert_figures(plot_bench(str(csv_path), out), out / "models")


def test_plot_bench_untimed_and_mixed(tmp_path: Path) -> None:
    csv_path = tmp_path / "both.csv"
    rows = bench_rows("mlp", [4, 16], SWEEP, timed=False) + bench_rows("resnet50", [16], MODELS)
    write_csv(rows, csv_path)
    assert_figures(plot_bench(csv_path), tmp_path / "both_depth", tmp_path / "both_models")


def test_plot_bench_errors(tmp_path: Path) -> None:
    with pytest.raises(InertiaError, match=r"no .*missing\.csv"):
        plot_bench(tmp_path / "missing.csv")
    other = tmp_path / "other.csv"
    other.write_text("dtype,gamma,depth\nfloat32,0.9,4\n")
    with pytest.raises(InertiaError, match="not a benchmark CSV: no column variant"):
        plot_bench(other)


def test_missing_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_metrics(tmp_path, 2)
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(InertiaError, match=r"pip install 'inertia\[plot\]'"):
        plot_training(tmp_path)
