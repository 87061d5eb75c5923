"""Examples and benchmark scripts run at tiny sizes, so that they cannot rot."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from inertia.bench import BenchConfig, run

ROOT = Path(__file__).resolve().parents[1]


def load(path: Path) -> ModuleType:
    """The script at ``path`` as a module, registered (its dataclasses need it) under a name that
    no package has: benchmarks/kernels.py is not the `kernels` package transformers imports."""
    name = f"_script_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_demo_runs_and_saves_memory() -> None:
    demo = load(ROOT / "examples" / "nested_rings.py")
    result = demo.main(["--depth", "16", "--steps", "3", "--batch", "32"])
    assert result["backprop_bytes"] > 5 * result["free_bytes"]


def test_benchmark_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = load(ROOT / "benchmarks" / "memory_vs_depth.py")
    script.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "memory_vs_depth_quick.csv").read_text().startswith("variant,case,depth")
    assert (tmp_path / "memory_vs_depth_quick.png").stat().st_size > 10_000
    assert "| depth | plain | checkpoint |" in capsys.readouterr().out


def test_update_cost_script(tmp_path: Path) -> None:
    """benchmarks/update_cost.py --quick: a converted ResNet-50 against the original, and the
    update alone (its floor), timed."""
    script = load(ROOT / "benchmarks" / "update_cost.py")
    script.main(["--quick", "--out", str(tmp_path)])
    with (tmp_path / "update_cost_quick.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["setting"], r["model"]) for r in rows} == {
        (s, m)
        for s in ("inference", "training step")
        for m in ("original", "converted", "update alone")
    }
    assert all(float(r["ms"]) > 0 for r in rows)
    # ResNet-50's twelve momentum blocks (each stage's but the first block).
    assert (
        len(
            script.momentum_shapes(
                script.transform_to_momentumnet(script.torchvision.models.resnet50(), gamma=0.9),
                torch.randn(1, 3, 64, 64),
            )
        )
        == 12
    )
    table = (tmp_path / "update_cost_quick.md").read_text()
    assert table.startswith("Produced by `python benchmarks/update_cost.py --quick`")
    assert "| update alone (floor) |" in table


def test_kernels_script(tmp_path: Path) -> None:
    """benchmarks/kernels.py --quick: every kernel timed per element, the update on one grid and
    on a grid per row too, and the moving grid's update and inverse."""
    script = load(ROOT / "benchmarks" / "kernels.py")
    script.main(["--quick", "--out", str(tmp_path)])
    with (tmp_path / "kernels_quick.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12
    assert sum("a grid per row" in r["kernel"] for r in rows) == 4
    assert sum("moving grid" in r["kernel"] for r in rows) == 2
    assert all(float(r["ns_per_element"]) > 0 for r in rows)


def test_bench_memory_ordering() -> None:
    """Memory-free keeps less than checkpointing, which keeps less than plain, at depth 32."""
    rows = run(BenchConfig(depths=(32,), width=32, batch=16, time_steps=False, threads=None))
    peak = {r.variant: r.peak_saved_bytes for r in rows}
    assert peak["momentum_free"] < peak["checkpoint"] < peak["plain"]
    assert peak["momentum_backprop"] >= peak["plain"]


def test_models_benchmark_script(tmp_path: Path) -> None:
    script = load(ROOT / "benchmarks" / "models.py")
    script.main(["--quick", "--out", str(tmp_path)])
    rows = (tmp_path / "models_quick.csv").read_text().splitlines()
    assert rows[0].startswith("variant,case,depth")
    cases = {row.split(",")[1] for row in rows[1:]}
    assert cases == {"resnet18", "transformer2"}
    peaks = {(row.split(",")[0], row.split(",")[1]): int(row.split(",")[4]) for row in rows[1:]}
    # Checkpointing and the memory-free stack both keep less than the original model; exact mode
    # does on the encoder (its ResNet-18 stages have one momentum block each: reported only).
    for case in cases:
        assert peaks["momentum_free", case] < peaks["plain", case]
        assert peaks["checkpoint", case] < peaks["plain", case]
    assert peaks["momentum_exact", "transformer2"] < peaks["plain", "transformer2"]
    assert peaks["momentum_exact_ckpt_stem_first", "resnet18"] < peaks["plain", "resnet18"]


def test_true_peak_benchmark_script(tmp_path: Path) -> None:
    """benchmarks/true_peak.py --quick: two variants of a tiny stack, three fresh processes."""
    script = load(ROOT / "benchmarks" / "true_peak.py")
    script.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    rows = list(csv.DictReader((tmp_path / "true_peak_quick.csv").read_text().splitlines()))
    variants = ["plain", "momentum_free", "checkpoint_whole", "floor"]
    assert [r["variant"] for r in rows] == variants
    assert all(float(r["step_ms"]) > 0 for r in rows)
    assert all(int(r["saved_bytes"]) > 0 for r in rows[:2])
    assert float(rows[0]["time_ratio"]) == 1.0
    for floor in rows[2:]:  # timed only: checkpointing recomputing whole, plus the integer kernels
        assert math.isnan(float(floor["saved_bytes"]))
        assert math.isnan(float(floor["peak_bytes"]))
        assert float(floor["time_ratio"]) > 0
    table = (tmp_path / "true_peak_quick.md").read_text()
    assert table.startswith("Produced by `python benchmarks/true_peak.py --quick --threads 1`")
    assert f"torch {torch.__version__}" in table
    assert "| mlp 64, depth 4, batch 64 | momentum_free |" in table
    assert "| mlp 64, depth 4, batch 64 | floor | n/a | n/a | n/a |" in table


def test_llm_benchmark_script(tmp_path: Path) -> None:
    """benchmarks/llm.py --quick: a 2-layer random Llama trained on its loss, full and LoRA,
    against HuggingFace's checkpointing with and without the chunked loss, and float memory-free,
    each variant in a fresh process, and the floor, timed; the split, targets, exact-cost and floor
    tables follow the rows."""
    pytest.importorskip("peft")
    script = load(ROOT / "benchmarks" / "llm.py")
    script.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    rows = list(csv.DictReader((tmp_path / "llm_quick.csv").read_text().splitlines()))
    variants = ("plain", "checkpoint", "checkpoint_chunked", "default_chunked", "float_chunked")
    assert {(r["case"], r["variant"]) for r in rows} == {
        (f"llama-tiny, seq 32, batch 1, {kind}", variant)
        for kind in ("full", "LoRA")
        for variant in (*variants, "floor_chunked")
    }
    by = {(r["case"].rsplit(", ", 1)[1], r["variant"]): r for r in rows}
    vocab = 32 * 4 * 512  # tokens x float32 x tiny_llama's vocabulary, all under one chunk
    for kind in ("full", "LoRA"):
        saved = {v: int(by[kind, v]["saved_bytes"]) for v in variants}
        stack = {v: float(by[kind, v]["stack_saved_bytes"]) for v in variants}
        assert saved["checkpoint"] < saved["plain"]
        # The chunked loss saves the hidden states, not the logits and their log-softmax.
        assert saved["checkpoint_chunked"] < saved["checkpoint"]
        # The decoder stack alone (found inside peft's wrapper too): each layer's input against
        # every activation.
        assert 0 < 4 * stack["checkpoint"] < stack["plain"] < saved["plain"]
        assert stack["checkpoint_chunked"] == stack["checkpoint"]
        assert {int(by[kind, v]["logits_bytes"]) for v in variants} == {vocab}
    # Every weight's gradient against the adapters' alone.
    full, lora = (int(by[kind, "plain"]["gradient_bytes"]) for kind in ("full", "LoRA"))
    assert full == int(by["full", "plain"]["parameter_bytes"]) > 10 * lora > 0
    table = (tmp_path / "llm_quick.md").read_text()
    assert "| llama-tiny, seq 32, batch 1, LoRA | default_chunked |" in table
    assert "Targets at 32 tokens" in table
    assert "| <= 0.60x |" in table
    assert "| llama-tiny, seq 32, batch 1, LoRA | step (ms) |" in table.split("Exact mode's")[1]
    floors = table.split("The floor: ")[1]
    assert "| llama-tiny, seq 32, batch 1, LoRA | " in floors
    assert all(math.isnan(float(r["peak_bytes"])) for r in rows if r["variant"] == "floor_chunked")
    assert all(not r["reason"] for r in rows)


def test_llm_grid_script(tmp_path: Path) -> None:
    """benchmarks/llm_grid.py --quick: a 2-layer random Llama's growth, word and kept bytes at
    each gamma, and the exact forward's precision with the defaults and on each grid, in units of
    float32 rounding (coarser grids are further)."""
    pytest.importorskip("transformers")
    script = load(ROOT / "benchmarks" / "llm_grid.py")
    rows = script.measure(quick=True, tokens=32)
    assert [r["gamma"] for r in rows] == list(script.GAMMAS)
    for r in rows:
        assert r["worst"] >= r["median"] > 0
        assert r["word"] in ("int32", "int32, moving", "int64")
        # Beside the output: x's one-byte correction and v's word and the buffer (int32 words),
        # or x, v and the buffer in int64 words.
        assert r["kept"] >= (6 if r["word"].startswith("int32") else 17)
        ratios = [r["precision"][b] for b in script.GRID_BITS]
        assert ratios[-1] > ratios[0] > 0
        assert r["precision"]["moving"] > 0
    script.main(["--quick", "--out", str(tmp_path)])
    table = (tmp_path / "llm_grid_quick.md").read_text()
    assert table.startswith("Produced by `python benchmarks/llm_grid.py --quick` (")
    assert "| b = 24 (7 bits above) |" in table


def test_compile_benchmark_script(tmp_path: Path) -> None:
    """benchmarks/compile.py at tiny size, with a backend that compiles quickly (aot_eager)."""
    script = load(ROOT / "benchmarks" / "compile.py")
    script.main(["--quick", "--backend", "aot_eager", "--out", str(tmp_path)])
    rows = (tmp_path / "compile_quick.csv").read_text().splitlines()
    assert rows[0].startswith("variant,description,step_ms")
    assert [row.split(",")[0] for row in rows[1:]] == list(script.VARIANTS)


def test_gpu_script_runs_small_on_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu.py, prepared for a GPU run, at tiny sizes here so that it cannot rot."""
    script = load(ROOT / "benchmarks" / "gpu.py")
    # A budget no machine runs out of: the guards have their own test below.
    args = ["--small", "--device", "cpu", "--steps", "1", "--budget", "3600"]
    script.main([*args, "--row-seconds", "3600", "--out", str(tmp_path)])
    table = (tmp_path / "gpu_small.md").read_text()
    for name in ("resnet101", "encoder4", "smollm2"):
        assert f"## {name}:" in table
    raw = json.loads((tmp_path / "gpu_small.json").read_text())
    rows = raw["results"]
    lines = (tmp_path / "gpu_small.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows  # one line per row, as it went
    assert len(rows) == 3 * len(script.PRECISIONS) * len(script.VARIANTS)
    assert all(r["status"] == "ok" and r["step_ms"] > 0 for r in rows)
    # Exact mode's gradients are those of its twin (the GPU target: 1e-5 with TF32 on); under
    # bf16 both are compared with float32 truth and the twin's own error stands beside.
    exact = [r for r in rows if r["variant"] == "momentum_exact"]
    assert all(r["grad_error"] <= 1e-5 for r in exact if r["precision"] == "fp32")
    assert all("twin_grad_error" in r for r in exact if r["precision"] == "bf16")
    assert all(r["buffer_error"] == 0.0 for r in exact)


def test_gpu_script_time_guard_records_and_goes_on(tmp_path: Path) -> None:
    """A row past its guard is recorded as such, and the rows after it still run."""
    script = load(ROOT / "benchmarks" / "gpu.py")
    args = ["--small", "--device", "cpu", "--steps", "1", "--only", "encoder4"]
    script.main([*args, "--row-seconds", "0.001", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "gpu_small.json").read_text())["results"]
    assert len(rows) == len(script.PRECISIONS) * len(script.VARIANTS)
    assert all(r["status"].startswith("RowTimeout") for r in rows)


def test_gpu_diagnose_script_runs_small_on_cpu(tmp_path: Path) -> None:
    script = load(ROOT / "benchmarks" / "gpu_diagnose.py")
    script.main(["--small", "--device", "cpu", "--out", str(tmp_path)])
    raw = json.loads((tmp_path / "gpu_diagnose_small.json").read_text())
    assert all(r["twin_vs_twin"]["grad_error"] == 0.0 for r in raw["floor"])  # CPU: deterministic
    assert all(r["free_vs_twin"]["grad_error"] <= 1e-5 for r in raw["tf32"])
    # Forward, then the backward's recomputation in reverse, for the recomputing variants; -1 is
    # the step's end.
    order = {t["variant"]: [i for i, _, _ in t["points"]] for t in raw["timelines"]}
    assert order["momentum_exact"] == order["checkpoint"] == [0, 1, 2, 3, 3, 2, 1, 0, -1]
    assert order["plain"] == [0, 1, 2, 3, -1]
    script.main(["--small", "--device", "cpu", "--out", str(tmp_path), "--parts", "timeline"])
    raw = json.loads((tmp_path / "gpu_diagnose_small.json").read_text())
    assert raw["floor"] == raw["tf32"] == []
    assert len(raw["timelines"]) == 4


def test_bf16_benchmark_script(tmp_path: Path) -> None:
    """benchmarks/bf16.py --quick: a 2-layer random Llama in float32, bfloat16 weights and under
    autocast; memory-free exact gradients as close to the float32 truth as autograd through the
    same momentum stack, in every precision, on each of two random inputs."""
    script = load(ROOT / "benchmarks" / "bf16.py")
    script.main(["--quick", "--threads", "1", "--seeds", "2", "--out", str(tmp_path)])
    peaks = list(csv.DictReader((tmp_path / "bf16_quick.csv").read_text().splitlines()))
    assert {r["case"].rsplit(", ", 1)[-1] for r in peaks} >= {"bfloat16", "autocast"}
    half = {r["variant"]: int(r["parameter_bytes"]) for r in peaks if "bfloat16" in r["case"]}
    assert half["momentum_exact"] * 2 == int(peaks[0]["parameter_bytes"])
    rows = list(csv.DictReader((tmp_path / "bf16_quick_gradients.csv").read_text().splitlines()))
    assert {r["seed"] for r in rows} == {"0", "1"}
    for seed in ("0", "1"):
        error = {
            (r["precision"], r["variant"], part): float(r[f"{part}gradient_error"])
            for r in rows
            if r["seed"] == seed
            for part in ("", "stack_")
        }
        for part in ("", "stack_"):
            assert error["float32", "momentum_backprop", part] == 0  # the truth itself
            assert error["float32", "momentum_exact", part] <= 1e-5
            for precision in ("bfloat16", "autocast"):
                backprop = error[precision, "momentum_backprop", part]
                assert 1e-4 < backprop < 5e-2  # bfloat16 rounding, measured
                assert error[precision, "momentum_exact", part] <= 1.5 * backprop
                assert 1e-4 < error[precision, "plain", part] < 5e-2
    table = (tmp_path / "bf16_quick_gradients.md").read_text()
    assert "| gradient error, all | gradient error, stack | loss error |" in table
    assert table.startswith("Produced by `python benchmarks/bf16.py --quick --threads 1 --seeds 2`")
    flags = ["--quick", "--only", "gradients", "--gamma", "0.875", "--seeds", "1", "--stem", "g"]
    script.main([*flags, "--threads", "1", "--out", str(tmp_path / "g")])
    written = sorted(f.name for f in (tmp_path / "g").iterdir())
    assert written == ["g_gradients.csv", "g_gradients.md"]
    assert "at gamma 0.875." in (tmp_path / "g" / "g_gradients.md").read_text()
