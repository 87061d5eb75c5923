"""The paper's experiments at tiny size: each checks its qualitative claim on 3 seeds, so that a
regression in the library shows up as a failed claim."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from inertia import bench
from inertia.experiments import (
    EXPERIMENTS,
    ExperimentConfig,
    ExperimentResult,
    linear_maps,
    list_experiments,
    llm,
    memory,
    ode_limit,
    optimize,
    run_experiment,
    write_results,
)
from inertia.experiments._core import states, tied_net

QUICK = ExperimentConfig(quick=True, seeds=(0, 1, 2))


def run(name: str) -> ExperimentResult:
    result = run_experiment(name, QUICK)
    assert result.holds, f"{name}: {result.summary}\n{result.rows}"
    assert len(result.rows) >= 3
    assert all(len(r) == len(result.columns) for r in result.rows)
    return result


def test_registry_in_the_papers_order() -> None:
    assert list_experiments() == [
        "crossing", "rings", "linear-maps", "optimize", "gamma", "memory", "ode-limit", "llm",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="unknown experiment"):
        run_experiment("nope")


def test_crossing_momentum_crosses_the_resnet_cannot() -> None:
    result = run("crossing")
    for _, momentum, resnet, _, increasing, _ in result.rows:
        assert momentum < 0.1 * resnet
        assert increasing  # the ResNet stayed a discretized flow, which is why it fails
        assert resnet >= 1 / 7 - 0.01  # no increasing map does better than mean(x^6)


def test_rings_momentum_separates() -> None:
    result = run("rings")
    assert all(r[1] >= 0.9 for r in result.rows)


def test_linear_maps_closed_form_matches_an_ode_solver() -> None:
    torchdiffeq = pytest.importorskip("torchdiffeq")
    theta = torch.tensor([-40.0, -10.0, -2.0, -0.1, 0.5], dtype=torch.float64)
    eps = 0.7

    def rhs(_: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.stack([y[1], (theta * y[0] - y[1]) / eps])

    y0 = torch.stack([torch.ones_like(theta), torch.zeros_like(theta)])
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    solved = torchdiffeq.odeint(rhs, y0, t, rtol=1e-10, atol=1e-10)[-1, 0]
    torch.testing.assert_close(linear_maps.closed_form_ratio(theta, eps), solved)


def test_linear_maps_negative_ratios_for_momentum_only() -> None:
    result = run("linear-maps")
    assert max(result.data["closed"]) < 0
    assert min(result.data["resnet"]) >= 0
    ratio, _ = linear_maps.most_negative_ratio(100.0)
    assert ratio == pytest.approx(-math.exp(-1 / 200), abs=0.01)  # tends to -1 as eps grows


def test_optimize_arms_share_one_recursion() -> None:
    """The RevNet arm's hand-written loop is MomentumNet's recursion at gamma = 1: at gamma < 1
    the same loop gives MomentumNet's states (blocks f / (1 - gamma))."""
    size = optimize._Size(m=6, d=3, steps=0, train_depth=5, max_depth=5)
    a, b, _, x0 = optimize.least_squares(4, size, torch.Generator().manual_seed(0))
    gamma, block = 0.6, optimize.GradientStep()
    v, x, loop = torch.zeros_like(x0), x0, [x0]
    for _ in range(5):
        v = gamma * v + block(x, a, b)
        x = x + v
        loop.append(x)
    scaled = optimize.GradientStep(scale=1 / (1 - gamma))
    torch.testing.assert_close(states(tied_net(scaled, 5, gamma), x0, a, b), torch.stack(loop))


def test_optimize_momentum_converges_revnet_oscillates() -> None:
    run("optimize")


def test_gamma_accuracy_flat_in_gamma() -> None:
    result = run("gamma")
    assert {r[0] for r in result.rows} == {"digits"}  # quick: the digits only
    # Exact mode's buffer: nan at gamma 0 (backprop only), else near log2(1 / gamma) per block.
    for row in result.rows:
        gamma, bits = row[1], row[-2]
        assert math.isnan(bits) if gamma == 0 else 0 < bits - math.log2(1 / gamma) < 0.1


def test_memory_free_constant_in_depth() -> None:
    result = run("memory")
    assert memory.variants() == tuple(v for v in bench.VARIANTS if v != "momentum_backprop")
    names = list(memory.variants())
    assert "momentum_exact" in names
    assert [c.removesuffix(" peak MiB") for c in result.columns[2 : 2 + len(names)]] == names


def test_memory_reports_true_peaks_of_the_first_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The experiment takes its true peaks from bench.true_peak (faked here: it starts processes,
    which tests/test_bench_peak.py checks), for the first seed only."""
    asked: list[tuple[int, str]] = []

    def fake(case: bench.PeakCase, variant: str, **kwargs: object) -> bench.TruePeak:
        asked.append((case.depth, variant))
        step = bench.StepPeak(case.depth * 2.0**20, 0.0, 0, "rss")
        return bench.TruePeak(case.label(), variant, "cpu", step, step, None, 0, 0)

    monkeypatch.setattr(bench, "true_peak", fake)
    config = ExperimentConfig(quick=True, seeds=(3, 4), true_peak=True)
    result = run_experiment("memory", config)
    names = memory.variants()
    depths = sorted({r[1] for r in result.rows})
    assert sorted(asked) == sorted((d, v) for d in depths for v in names)
    columns = [c for c in result.columns if c.endswith(" true peak MiB")]
    assert columns == [f"{v} true peak MiB" for v in names]
    for row in result.rows:
        peaks = row[-1 - len(names) : -1]
        expected = float(row[1]) if row[0] == 3 else math.nan
        assert all(p == expected or (math.isnan(p) and math.isnan(expected)) for p in peaks)
    assert "true peak of a step" in result.summary


def test_ode_limit_error_falls_like_h() -> None:
    pytest.importorskip("torchdiffeq")
    result = run("ode-limit")
    assert all(0.8 <= r[-3] <= 1.2 for r in result.rows)


def test_ode_limit_rejects_negative_gamma() -> None:
    with pytest.raises(ValueError, match="gamma"):
        ode_limit.discretize(torch.nn.Identity(), 2, torch.zeros(1))


def test_llm_corpus_is_pinned_and_split_by_module() -> None:
    corpus = llm.load_corpus()
    assert len(corpus) == 194  # the pinned snapshot
    assert sum(map(len, corpus.values())) == 715_321
    train, held = llm.split(list(corpus))
    assert not set(train) & set(held)
    assert set(train) | set(held) == set(corpus)
    assert len(held) == 19
    assert "inspect" in held


def test_llm_paired_ratio() -> None:
    modules = [m for m in "abcdefgh" for _ in range(3)]
    anchor = torch.rand(len(modules), dtype=torch.float64) + 2
    ratio, low, high = llm.paired_ratio(anchor + 0.1, anchor, modules)
    assert ratio == pytest.approx(math.exp(0.1))
    assert high - low < 1e-12  # no spread, no width
    shift = torch.tensor([0.05 * "abcdefgh".index(m) for m in modules], dtype=torch.float64)
    ratio, low, high = llm.paired_ratio(anchor + shift, anchor, modules)
    assert ratio == pytest.approx(math.exp(0.175))
    assert math.exp(0.0) < low < ratio < high < math.exp(0.35)


def test_llm_fine_tuning_matches_the_backprop_twin() -> None:
    """The pipeline on a 2-layer random Llama: every arm trains, the memory-free arms' gradients
    and losses match their backprop twin's, and the decoder stack's saved bytes order as
    expected at every sequence length."""
    pytest.importorskip("transformers")
    result = run_experiment("llm", ExperimentConfig(quick=True, seeds=(0,)))
    assert all(len(r) == len(result.columns) for r in result.rows)
    d = result.data
    assert d["twin_ok"]
    for gamma in llm.TUNED:
        twin = d["runs"][gamma]["twin"]
        assert len(twin["loss"]) == 3
        assert twin["loss"][0][0] == twin["loss"][0][1]
        assert sorted(k for k in twin if k.startswith("grad")) == ["grad step 1", "grad step 8"]
        assert all(twin[k][0] <= llm.TWIN_TOL for k in ("grad step 1", "grad step 8"))
    for run in d["runs"].values():
        assert len(run["steps"]) == 5
        assert run["nll"][-1].mean() < run["nll"][0].mean()
    memory = d["memory"]
    for i, n in enumerate(d["memory_seqs"]):
        assert memory["plain"][i] > 4 * memory["checkpoint"][i] > 0
        assert memory["momentum_exact"][i] > memory["momentum_free"][i] > 0
        assert memory["plain"][i] == memory["plain"][0] * n // d["memory_seqs"][0]


def test_write_results(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    result = run_experiment("ode-limit", ExperimentConfig(quick=True, seeds=(0,)))
    paths = write_results(result, tmp_path, "inertia experiment ode-limit --quick")
    assert sorted(p.name for p in paths) == ["ode-limit.csv", "ode-limit.md", "ode-limit.png"]
    md = (tmp_path / "ode-limit.md").read_text()
    assert "`inertia experiment ode-limit --quick`" in md
    assert "![" in md
    assert (tmp_path / "ode-limit.csv").read_text().splitlines()[0].startswith("seed,")
    assert set(EXPERIMENTS) == set(list_experiments())
