"""Experiment 8: a pretrained LLM converted to a momentum network, then fine-tuned memory-free.

The paper's "pre-training and fine-tuning" claim, on a real pretrained decoder:
SmolLM2-135M-Instruct (`inertia.models.smollm2`, 30 Llama layers). Its decoder stack is converted
with `transform_to_momentumnet` at several gammas; the experiment measures what the conversion costs
(zero-shot held-out perplexity) and how much of it fine-tuning wins back, against the original
fine-tuned with the same steps, learning rate and batches (the anchor). The converted arms train
memory-free in the default (exact) arithmetic; their backprop twin (`inertia.testing.backprop_twin`)
checks their gradients at the first and last step and their losses over the first three.

The text is a pinned snapshot of the docstrings of Python's standard library (`CORPUS`, written by
`pin_corpus` under Python 3.11): docstrings differ between Python versions, so the snapshot, not the
running interpreter, is the data. It is split by module, every tenth module (in sorted order) held
out. ``--quick`` runs the same pipeline on a 2-layer random Llama reading UTF-8 bytes.
"""

from __future__ import annotations

import copy
import gzip
import importlib
import inspect
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._errors import InertiaError
from ..testing import backprop_twin, relative_error
from ._core import ExperimentConfig, ExperimentResult, register

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["CORPUS", "load_corpus", "paired_ratio", "pin_corpus", "pretrained_llm", "split"]

CORPUS = Path(__file__).with_name("stdlib_docstrings.json.gz")
# Modules whose import has side effects (a browser, a window, printed text) or needs a display.
_UNSAFE = frozenset({"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"})
HELD_OUT_EVERY = 10  # every tenth module, in sorted order, is held out
MARGIN = 0.05  # the claim: fine-tuned converted perplexity at most 5% above the anchor's
ZERO_SHOT = (0.1, 0.5, 0.9)  # gammas converted and evaluated before any training
TUNED = (0.5, 0.9)  # gammas fine-tuned
TWIN_TOL = 1e-5  # memory-free gradients and losses against the backprop twin (relative)
BOOTSTRAP = 4000  # resamples of held-out modules for the confidence intervals


@dataclass(frozen=True)
class _Setting:
    model: str  # "smollm2" (the pretrained weights) or "llama-tiny" (random, UTF-8 bytes)
    seq: int  # tokens per sequence, training and evaluation
    batch: int
    steps: int
    evals: int  # evaluation points after step 0, evenly spaced
    lr: float
    warmup: int  # linear warm-up steps, then cosine decay to 0
    held_out: int | None  # held-out sequences evaluated (None: all)
    memory_seqs: tuple[int, ...]  # sequence lengths of the memory panel


FULL = _Setting("smollm2", 256, 2, 100, 4, 1e-4, 10, None, (256, 512, 1024))
QUICK = _Setting("llama-tiny", 32, 2, 8, 4, 3e-3, 2, 24, (32, 64, 128))


def pin_corpus(path: Path | str = CORPUS) -> dict[str, str]:
    """Collect the standard library's docstrings into ``path`` (gzipped JSON) and return them.

    One text per public module: its docstring, then those of its public classes, their public
    methods and its public functions, in sorted order. The committed `CORPUS` was written with
    Python 3.11; rerunning under another version gives other text, which is why it is pinned.
    """
    modules: dict[str, str] = {}
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _UNSAFE:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated modules warn when imported
            try:
                module = importlib.import_module(name)
            except Exception:  # platform modules missing here, or failing at import
                continue
        text = _docstrings(module)
        if text:
            modules[name] = text
    record = {"python": sys.version.split()[0], "modules": modules}
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        json.dump(record, fh, ensure_ascii=False, sort_keys=True)
    return modules


def _docstrings(module: Any) -> str:
    name = module.__name__
    public = getattr(module, "__all__", None) or [a for a in dir(module) if not a.startswith("_")]
    parts = [inspect.getdoc(module) or ""]
    for attr in sorted(public):
        obj = getattr(module, attr, None)
        if getattr(obj, "__module__", None) != name:
            continue  # re-exported from elsewhere
        if inspect.isclass(obj):
            parts.append(inspect.getdoc(obj) or "")
            for method_name, method in sorted(vars(obj).items()):
                if not method_name.startswith("_") and inspect.isfunction(method):
                    parts.append(inspect.getdoc(method) or "")
        elif inspect.isfunction(obj):
            parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(p for p in parts if p.strip())


def load_corpus(path: Path | str = CORPUS) -> dict[str, str]:
    """The pinned docstrings, ``{module: text}`` in sorted module order."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        modules: dict[str, str] = json.load(fh)["modules"]
    return dict(sorted(modules.items()))


def split(modules: list[str]) -> tuple[list[str], list[str]]:
    """``(train, held_out)`` module names: every `HELD_OUT_EVERY`-th module in sorted order is held
    out, so that no module's text is on both sides."""
    names = sorted(modules)
    held = names[HELD_OUT_EVERY // 2 :: HELD_OUT_EVERY]
    return [n for n in names if n not in set(held)], held


def pretrained_llm(model: str, seed: int = 0) -> tuple[Any, Callable[[str], list[int]], int]:
    """``(model, encode, eos_id)``: ``"smollm2"``, the pretrained SmolLM2-135M-Instruct and its
    tokenizer; ``"llama-tiny"``, a 2-layer random Llama of its design (seeded) reading UTF-8
    bytes."""
    from ..models.smollm2 import load_smollm2, tiny_llama

    if model == "smollm2":
        llm, tokenizer = load_smollm2()
        return llm, lambda text: tokenizer(text).input_ids, int(tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return tiny_llama(2, 64), lambda text: list(text.encode()), 0


def _sequences(
    corpus: dict[str, str], names: list[str], encode: Callable[[str], list[int]], eos: int, n: int
) -> tuple[Tensor, list[str]]:
    """The modules' texts, each followed by ``eos``, concatenated and cut into sequences of ``n``
    tokens (the remainder dropped), and the module each sequence starts in."""
    ids: list[int] = []
    owner: list[str] = []
    for name in names:
        tokens = [*encode(corpus[name]), eos]
        ids += tokens
        owner += [name] * len(tokens)
    count = len(ids) // n
    return torch.tensor(ids[: count * n]).view(count, n), [owner[i * n] for i in range(count)]


@torch.no_grad()
def _nll(model: Any, sequences: Tensor, batch: int = 8) -> Tensor:
    """Mean next-token negative log-likelihood of each sequence (nats), in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    for ids in torch.split(sequences, batch):
        logits = model(ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), ids[:, 1:], reduction="none"
        )
        out.append(loss.mean(1).double())
    model.train(was_training)
    return torch.cat(out)


def paired_ratio(
    nll: Tensor, anchor: Tensor, modules: list[str], seed: int = 0
) -> tuple[float, float, float]:
    """Perplexity of ``nll`` over ``anchor``'s on the same held-out sequences, with a 95%
    confidence interval: ``(ratio, low, high)``.

    The ratio is ``exp(mean(nll - anchor))`` over the sequences (of equal length). The interval is
    a percentile bootstrap that resamples held-out modules, not sequences, since sequences of one
    module are alike.
    """
    diff = (nll - anchor).double()
    groups = sorted(set(modules))
    index = {m: i for i, m in enumerate(groups)}
    member = torch.tensor([index[m] for m in modules])
    sums = torch.zeros(len(groups), dtype=torch.float64).index_add_(0, member, diff)
    counts = torch.zeros(len(groups), dtype=torch.float64).index_add_(
        0, member, torch.ones_like(diff)
    )
    gen = torch.Generator().manual_seed(seed)
    draw = torch.randint(len(groups), (BOOTSTRAP, len(groups)), generator=gen)
    boot = (sums[draw].sum(1) / counts[draw].sum(1)).exp()
    low, high = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return math.exp(float(diff.mean())), low, high


def _convert(original: Any, gamma: float) -> Any:
    from ..models.smollm2 import LAYERS
    from ..transform import transform_to_momentumnet

    return transform_to_momentumnet(
        copy.deepcopy(original), LAYERS, keep_first_layer=False, gamma=gamma, inplace=True
    )


def _optimizer(model: Any, s: _Setting) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0)

    def factor(step: int) -> float:
        if step < s.warmup:
            return (step + 1) / s.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - s.warmup) / max(1, s.steps - s.warmup)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _loss(model: Any, ids: Tensor) -> Tensor:
    return model(ids, labels=ids).loss  # type: ignore[no-any-return]


def _grad_errors(model: Any, twin: Any) -> tuple[float, float]:
    """(global, worst parameter) relative error of ``model``'s gradients against ``twin``'s."""
    pairs = [
        (p.grad, q.grad)
        for p, q in zip(model.parameters(), twin.parameters(), strict=True)
        if q.grad is not None
    ]
    num = math.sqrt(sum(float((a.double() - b.double()).norm()) ** 2 for a, b in pairs))
    den = math.sqrt(sum(float(b.double().norm()) ** 2 for _, b in pairs))
    return num / den, max(relative_error(a, b) for a, b in pairs)


def _finetune(
    model: Any, train: Tensor, held_out: Tensor, s: _Setting, seed: int, twin_checks: bool
) -> dict[str, Any]:
    """Fine-tune ``model`` for ``s.steps`` steps; the held-out NLL per sequence at each evaluation
    point, the losses, and (``twin_checks``) the comparisons with the backprop twin."""
    model.config.use_cache = False
    model.train()
    opt, schedule = _optimizer(model, s)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    evals = sorted({round(k * s.steps / s.evals) for k in range(s.evals + 1)})
    out: dict[str, Any] = {"steps": evals, "nll": [], "losses": [], "twin": {}}
    twin: Any = None
    start = time.perf_counter()
    for step in range(s.steps + 1):
        if step in evals:
            out["nll"].append(_nll(model, held_out))
        if step == s.steps:
            break
        ids = train[order[torch.arange(step * s.batch, (step + 1) * s.batch) % len(train)]]
        opt.zero_grad(set_to_none=True)
        if twin_checks and step in (0, s.steps - 1):
            twin = backprop_twin(model)  # the same weights, before this step's update
            if step == 0:  # only the first twin trains; the last one just compares
                twin_opt, twin_schedule = _optimizer(twin, s)
        loss = _loss(model, ids)
        loss.backward()  # type: ignore[no-untyped-call]
        out["losses"].append(loss.item())
        if twin is not None:
            twin_loss = _loss(twin, ids)
            twin_loss.backward()  # type: ignore[no-untyped-call]
            if step < 3:
                out["twin"].setdefault("loss", []).append((loss.item(), twin_loss.item()))
            if step in (0, s.steps - 1):
                out["twin"][f"grad step {step + 1}"] = _grad_errors(model, twin)
            if step < 2:  # the twin trains alongside for the first 3 steps' losses
                twin_opt.step()
                twin_schedule.step()
                twin_opt.zero_grad(set_to_none=True)
            else:
                twin = None
        opt.step()
        schedule.step()
    out["seconds"] = time.perf_counter() - start
    return out


def _memory(s: _Setting) -> dict[str, list[int]]:
    """Bytes the decoder stack saves for backward, per variant, at each of ``s.memory_seqs``."""
    from ..bench import PeakCase, stack_saved_bytes
    from ..bench._steps import build

    found: dict[str, list[int]] = {v: [] for v in MEMORY_VARIANTS}
    for n in s.memory_seqs:
        case = PeakCase(s.model, depth=2, width=64, batch=1, seq_len=n)
        for variant in MEMORY_VARIANTS:
            with warnings.catch_warnings():
                # HF's checkpointing says that it turns the cache off; peft's deprecations.
                warnings.simplefilter("ignore")
                model, inputs = build(case, variant, torch.device("cpu"), for_memory=True)
            stack = case.stack_of(model)
            assert stack is not None
            found[variant].append(stack_saved_bytes(model, inputs, stack))
            del model
    return found


MEMORY_VARIANTS = ("plain", "checkpoint", "momentum_exact", "momentum_free")
_ARM_LABELS = {0.0: "original (anchor)", 0.5: "converted, gamma 0.5", 0.9: "converted, gamma 0.9"}
_MEMORY_LABELS = {
    "plain": "plain autograd",
    "checkpoint": "HF activation checkpointing",
    "momentum_exact": "memory-free, exact (default)",
    "momentum_free": "memory-free, float",
}


def _plot(result: ExperimentResult, fig: Figure) -> None:
    from matplotlib.ticker import NullLocator

    d = result.data
    curve, mem = fig.subplots(1, 2)
    for i, (gamma, run) in enumerate(d["runs"].items()):
        ppl = [math.exp(float(n.mean())) for n in run["nll"]]
        curve.plot(run["steps"], ppl, marker="osD"[i], color=f"C{i}", label=_ARM_LABELS[gamma])
    for gamma, ppl in d["zero_shot"].items():
        if gamma not in d["runs"]:
            curve.plot(
                [0], [ppl], "x", color="gray", label=f"converted, gamma {gamma:g} (zero-shot)"
            )
    curve.set(yscale="log", xlabel="fine-tuning step", ylabel="held-out perplexity")
    curve.set_title("held-out perplexity while fine-tuning", fontsize=10)
    curve.grid(alpha=0.3)
    curve.legend(fontsize=7)
    seqs = d["memory_seqs"]
    for i, (variant, values) in enumerate(d["memory"].items()):
        mem.plot(seqs, [v / 2**20 for v in values], marker="os^v"[i], label=_MEMORY_LABELS[variant])
    mem.set(xscale="log", yscale="log", xlabel="sequence length (tokens, batch 1)")
    mem.set(ylabel="decoder stack's saved tensors after forward (MiB)")
    mem.set_xticks(seqs, [str(n) for n in seqs])
    mem.xaxis.set_minor_locator(NullLocator())
    mem.set_title("memory against sequence length", fontsize=10)
    mem.grid(alpha=0.3)
    mem.legend(fontsize=7)


@register("llm", "8. Fine-tuning a pretrained LLM", _plot)
def llm_finetuning(config: ExperimentConfig) -> ExperimentResult:
    """Zero-shot and fine-tuned held-out perplexity of the converted model against the anchor."""
    s = QUICK if config.quick else FULL
    seed = config.seeds[0]
    corpus = load_corpus()
    train_names, held_names = split(list(corpus))
    original, encode, eos = pretrained_llm(s.model, seed)
    original.config.use_cache = False
    train, _ = _sequences(corpus, train_names, encode, eos, s.seq)
    held_out, held_modules = _sequences(corpus, held_names, encode, eos, s.seq)
    if s.held_out is not None:  # evenly spaced, so that every held-out module is represented
        keep = torch.linspace(0, len(held_out) - 1, s.held_out).round().long()
        held_out, held_modules = held_out[keep], [held_modules[i] for i in keep.tolist()]
    if not config.quick and held_out.numel() < 16_384:
        raise InertiaError(f"only {held_out.numel()} held-out tokens; the experiment needs 16,384")

    zero_shot = {}
    for gamma in ZERO_SHOT:
        if gamma not in TUNED:
            zero_shot[gamma] = math.exp(float(_nll(_convert(original, gamma), held_out).mean()))
    runs: dict[float, dict[str, Any]] = {}
    for gamma in TUNED:
        runs[gamma] = _finetune(_convert(original, gamma), train, held_out, s, seed, True)
        zero_shot[gamma] = math.exp(float(runs[gamma]["nll"][0].mean()))
    runs = {0.0: _finetune(original, train, held_out, s, seed, False), **runs}
    zero_shot[0.0] = math.exp(float(runs[0.0]["nll"][0].mean()))
    memory = _memory(s)

    anchor = runs[0.0]
    rows: list[tuple[Any, ...]] = []
    for gamma in ZERO_SHOT:
        if gamma not in TUNED:
            ratio = zero_shot[gamma] / zero_shot[0.0]  # not paired: a point estimate
            rows.append((f"converted, gamma {gamma:g}", gamma, 0, zero_shot[gamma], ratio,
                         math.nan, math.nan, "—"))  # fmt: skip
    verdicts = {}
    for gamma, run in runs.items():
        for k, step in enumerate(run["steps"]):
            ppl = math.exp(float(run["nll"][k].mean()))
            if gamma == 0.0:
                rows.append((_ARM_LABELS[gamma], gamma, step, ppl, 1.0, math.nan, math.nan, "—"))
                continue
            ratio, low, high = paired_ratio(run["nll"][k], anchor["nll"][k], held_modules, seed)
            last = k == len(run["steps"]) - 1
            if last:
                verdicts[gamma] = (ratio, low, high, high <= 1 + MARGIN)
            rows.append((_ARM_LABELS[gamma], gamma, step, ppl, ratio, low, high,
                         high <= 1 + MARGIN if last else "—"))  # fmt: skip

    twin_notes, twin_ok = [], True
    for gamma in TUNED:
        checks = runs[gamma]["twin"]
        losses = max(abs(a - b) / abs(b) for a, b in checks["loss"])
        grads = [(k, v) for k, v in checks.items() if k.startswith("grad")]
        twin_ok &= losses <= TWIN_TOL and all(v[0] <= TWIN_TOL for _, v in grads)
        twin_notes.append(
            f"Backprop twin, gamma {gamma:g}: losses of the first {len(checks['loss'])} steps "
            f"within {losses:.1e} (relative); gradients "
            + ", ".join(f"{k}: {v[0]:.1e} globally, {v[1]:.1e} worst tensor" for k, v in grads)
            + f" (tolerance {TWIN_TOL:g} on the global error)."
        )
    memory_notes = [
        f"Decoder stack's saved tensors after the forward, sequence {n}: "
        + ", ".join(
            f"{_MEMORY_LABELS[v]} {memory[v][i] / 2**20:.2f} MiB"
            + ("" if v == "plain" else f" ({memory[v][i] / memory['checkpoint'][i]:.2f}x HF's)")
            for v in MEMORY_VARIANTS
        )
        + "."
        for i, n in enumerate(s.memory_seqs)
    ]
    holds = twin_ok and all(v[3] for v in verdicts.values())
    summary = "; ".join(
        f"gamma {g:g}: {r:.3f}x the anchor's perplexity (95% CI {lo:.3f}-{hi:.3f})"
        for g, (r, lo, hi, _) in verdicts.items()
    )
    if not twin_ok:
        summary += "; the memory-free gradients did NOT match the backprop twin's"
    model_words = (
        "SmolLM2-135M-Instruct (30 Llama layers, pretrained, float32)"
        if s.model == "smollm2"
        else "a 2-layer random Llama of SmolLM2's design reading UTF-8 bytes (quick mode)"
    )
    n_train = len(train_names)
    return ExperimentResult(
        name="llm",
        claim=(
            "a pretrained transformer converted to a momentum network and fine-tuned memory-free "
            "recovers the original's quality: after the same fine-tuning, its held-out perplexity "
            f"is within {MARGIN:.0%} of the original's fine-tuned the same way"
        ),
        check=(
            f"for gamma {' and '.join(f'{g:g}' for g in TUNED)}, the upper end of the 95% "
            "confidence interval of (converted perplexity / anchor perplexity) after the last "
            f"step is at most {1 + MARGIN:g}; and the memory-free gradients match the backprop "
            f"twin's within {TWIN_TOL:g} at the first and last step, losses over the first 3."
        ),
        holds=holds,
        summary=summary,
        setup=(
            f"{model_words}; decoder stack `model.layers` converted with "
            "`transform_to_momentumnet(keep_first_layer=False)`, memory-free, exact arithmetic "
            f"(the default). Data: the pinned docstrings of Python "
            f"{_corpus_python()}'s standard library ({len(corpus)} modules), split by module: "
            f"{n_train} for training ({train.numel():,} tokens), {len(held_names)} held out "
            f"({held_out.numel():,} tokens in {len(held_out)} sequences). Full fine-tuning of "
            f"every weight: AdamW (weight decay 0), lr {s.lr:g}, {s.warmup} warm-up steps then "
            f"cosine decay to 0, {s.steps} steps of batch {s.batch}, sequence {s.seq}; the same "
            "batches in the same order for every arm (seed "
            f"{seed}). Perplexity: exp of the mean next-token loss over the held-out sequences. "
            "Ratio to anchor: paired on the same sequences, at the same step; 95% CI: "
            f"percentile bootstrap over held-out modules ({BOOTSTRAP} resamples)."
        ),
        columns=(
            "arm",
            "gamma",
            "step",
            "held-out perplexity",
            "ratio to anchor",
            "95% CI low",
            "95% CI high",
            "within 5%",
        ),
        rows=rows,
        data={
            "runs": runs,
            "zero_shot": zero_shot,
            "memory": memory,
            "memory_seqs": s.memory_seqs,
            "twin_ok": twin_ok,
        },
        notes=[
            *twin_notes,
            *memory_notes,
            "Fine-tuning time per arm: "
            + ", ".join(f"{_ARM_LABELS[g]} {r['seconds']:.0f} s" for g, r in runs.items())
            + " (evaluations and, for the converted arms, the twin's steps included).",
        ],
    )


def _corpus_python() -> str:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as fh:
        return str(json.load(fh)["python"])
