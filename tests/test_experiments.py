"""The paper's experiments at tiny size: each checks its qualitative claim on 3 seeds, so that a
regression in the library shows up as a failed claim."""

from __future__ import annotations

import functools
import importlib.util
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


@functools.cache
def run_llm(parts: tuple[str, ...]) -> tuple[ExperimentResult, list[tuple[bench.PeakCase, str]]]:
    """The llm experiment's quick run of ``parts`` (once per session), with the true peaks
    faked (they start processes, which tests/test_bench_peak.py checks): its result and the
    (case, variant) pairs that it asked `bench.true_peak` for."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    asked: list[tuple[bench.PeakCase, str]] = []

    def fake(case: bench.PeakCase, variant: str, **kwargs: object) -> bench.TruePeak:
        asked.append((case, variant))
        mib = (2 if case.lora else 3) + case.gamma * (variant == "default")
        step = bench.StepPeak(mib * 2.0**20, 0.0, 0, "rss")
        return bench.TruePeak(case.label(), variant, "cpu", step, step, None, 0, 0)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench, "true_peak", fake)
        config = ExperimentConfig(quick=True, seeds=(0,), parts=parts)
        return run_experiment("llm", config), asked


def test_llm_choose_gammas() -> None:
    """The largest gamma within 5% (by its CI's upper end) and the next below; the two smallest
    where no gamma, or only the smallest, is within 5%."""

    def chosen(highs: list[float]) -> tuple[tuple[float, float], str]:
        cis = zip(llm.GAMMAS, highs, strict=True)
        return llm.choose_gammas({g: (h - 0.01, h - 0.02, h) for g, h in cis})

    assert chosen([1.01, 1.02, 1.04, 1.3, 3.0, 3000.0]) == (
        (0.03, 0.1),
        "gamma 0.1, the largest whose zero-shot perplexity is within 5% of the original's, and "
        "0.03, the next below",
    )
    assert chosen([1.01, 1.02, 1.051, 1.3, 3.0, 3000.0])[0] == (0.01, 0.03)  # 1.04, CI to 1.051
    assert chosen([1.06, 1.07, 1.06, 1.04, 3.0, 3000.0])[0] == (0.1, 0.3)  # the largest within
    assert chosen([1.0] * 6)[0] == (0.5, 0.9)
    pair, why = chosen([1.04, 1.06, 1.1, 1.3, 3.0, 3000.0])
    assert pair == (0.01, 0.03)
    assert why.startswith("only gamma 0.01's zero-shot perplexity is within 5%")
    pair, why = chosen([1.2, 1.3, 1.4, 2.0, 3.0, 3000.0])
    assert pair == (0.01, 0.03)
    assert why.startswith("no gamma's zero-shot perplexity is within 5%")
    with pytest.raises(ValueError, match="needs two"):
        llm.choose_gammas({0.5: (1.0, 1.0, 1.0)})


def test_llm_sweep_reads_bits_bytes_and_true_peaks() -> None:
    """The sweep on a 6-layer random Llama: each gamma's buffer bits (read from a forward's state)
    and stack bytes, HF checkpointing's, and the true peaks asked of `bench.true_peak`."""
    result, asked = run_llm(llm.PARTS)
    assert all(len(r) == len(result.columns) for r in result.rows)
    col = {c: i for i, c in enumerate(result.columns)}
    zero = {r[col["gamma"]]: r for r in result.rows if r[col["training"]] == "zero-shot"}
    assert list(zero) == [0.0, *llm.GAMMAS]
    per = {g: r[col["stack saved B per element"]] for g, r in zero.items()}
    used = {g: r[col["buffer bits used"]] for g, r in zero.items()}
    for g in llm.GAMMAS:
        stored = zero[g][col["buffer bits stored"]]
        assert 0 < used[g] <= stored
        assert stored in (8, 16, 32) or (stored - 64) % 32 == 0
        assert 0 < per[g] < per[0.0]  # HF checkpointing keeps each of the 6 layers' input
        assert isinstance(zero[g][col["within 5%"]], bool)
    assert per[0.0] == 6 * 4  # float32 inputs of 6 layers
    assert used[0.01] > used[0.1] > used[0.5]  # about log2(1 / gamma) bits per layer
    assert per[0.01] > per[0.5]
    peaks = {(c.lora, v, c.gamma if v == "default" else 0.0) for c, v in asked}
    variants = [("checkpoint", 0.0)] + [("default", g) for g in llm.GAMMAS]
    assert peaks == {(lora, v, g) for lora in (False, True) for v, g in variants}
    assert len(asked) == len(peaks)
    assert all(c.labels and c.batch == 1 and c.seq_len == 64 for c, _ in asked)
    assert zero[0.5][col["true peak LoRA MiB"]] == 2.5  # the fake's
    assert "sweep: " in result.summary


def test_llm_fine_tuning_full_and_lora_match_the_backprop_twin() -> None:
    """The fine-tuning arms at the gammas chosen from the zero-shot ratios, full and LoRA: every
    arm trains, the memory-free arms' gradients and losses match their backprop twin's."""
    result = run_llm(llm.PARTS)[0]
    d = result.data
    assert d["twin_ok"]
    tuned, _ = llm.choose_gammas(d["zero_shot"])
    assert d["tuned"] == tuned
    assert list(d["runs"]) == ["full", "LoRA"]
    for training, runs in d["runs"].items():
        assert list(runs) == [0.0, *tuned]
        for gamma, run in runs.items():
            assert run["steps"] == [0, 2, 4, 6, 8]
            assert torch.equal(run["nll"][0], d["nll"][gamma])  # step 0: the zero-shot
            assert run["nll"][-1].mean() < run["nll"][0].mean(), (training, gamma)
            if gamma:
                twin = run["twin"]
                assert len(twin["loss"]) == 3
                assert twin["loss"][0][0] == twin["loss"][0][1]
                grads = ["grad step 1", "grad step 8"]
                assert sorted(k for k in twin if k.startswith("grad")) == grads
                assert all(twin[k][0] <= llm.TWIN_TOL for k in grads)
    col = {c: i for i, c in enumerate(result.columns)}
    last = [r for r in result.rows if r[col["training"]] != "zero-shot" and r[col["step"]] == 8]
    assert sorted((r[col["training"]], r[col["gamma"]]) for r in last) == sorted(
        (t, g) for t in ("full", "LoRA") for g in (0.0, *tuned)
    )
    assert all(isinstance(r[col["within 5%"]], bool) for r in last if r[col["gamma"]])
    assert "fine-tuning: full, gamma" in result.summary
    assert "LoRA, gamma" in result.summary


def test_llm_parts_run_apart(tmp_path: Path) -> None:
    """``parts`` selects the sweep (memory, no fine-tuning) or the fine-tuning (no memory, no
    true peak); the zero-shot rows, which choose the tuned gammas, come with both."""
    sweep, asked = run_llm(("sweep",))
    assert not sweep.data["runs"]
    assert {r[1] for r in sweep.rows} == {"zero-shot"}
    assert len(asked) == 2 * (1 + len(llm.GAMMAS))
    assert "fine-tuning" not in sweep.summary
    finetune, asked = run_llm(("finetune",))
    assert not asked
    assert list(finetune.data["runs"]) == ["full", "LoRA"]
    memory = [c for c in finetune.columns if "bits" in c or "MiB" in c or "B per" in c]
    zero = [r for r in finetune.rows if r[1] == "zero-shot"]
    assert len(zero) == 1 + len(llm.GAMMAS)
    assert all(math.isnan(r[finetune.columns.index(c)]) for r in zero for c in memory)
    assert "sweep" not in finetune.summary
    with pytest.raises(ValueError, match="no part 'nope'; choose from sweep, finetune"):
        run_experiment("llm", ExperimentConfig(quick=True, parts=("nope",)))
    with pytest.raises(ValueError, match="has no parts to choose"):
        run_experiment("ode-limit", ExperimentConfig(quick=True, parts=("sweep",)))
    if importlib.util.find_spec("matplotlib"):  # each part's figure draws
        for result in (sweep, finetune):
            write_results(result, tmp_path, "inertia experiment llm --quick")


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
