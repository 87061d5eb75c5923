"""Experiment 8: a pretrained LLM converted to a momentum network, the gamma trade-off measured,
then fine-tuned memory-free.

The paper's "pre-training and fine-tuning" claim, on a real pretrained decoder:
SmolLM2-135M-Instruct (`inertia.models.smollm2`, 30 Llama layers). Its decoder stack is converted
with `transform_to_momentumnet` (memory-free, exact arithmetic: the default) at each gamma of
`GAMMAS`. Two parts, which run together or apart (`ExperimentConfig.parts`, ``inertia experiment
llm --part sweep``):

- ``sweep``: at each gamma, what the conversion costs and what it saves, against HuggingFace's
  checkpointing of the original: zero-shot held-out perplexity, the exact buffer's bits per
  element after the last layer (read from the state of a forward, `buffer_bits`), the bytes the
  stack saves for backward (`inertia.bench.stack_saved_bytes`), and the true peak of a training
  step at 2,048 tokens, full and LoRA (`inertia.bench.true_peak`);
- ``finetune``: the original and the converted model fine-tuned with the same steps and batches,
  fully and with LoRA, at two gammas chosen from the zero-shot perplexities (`choose_gammas`);
  each converted arm against the original fine-tuned the same way (its anchor). The converted
  arms' backprop twin (`inertia.testing.backprop_twin`) checks their gradients at the first and
  last step and their losses over the first three.

The zero-shot evaluation runs with either part: fine-tuning chooses its gammas from it, computed
again rather than read from an earlier sweep's files. The text is a pinned snapshot of the
docstrings of Python's standard library (`CORPUS`, written by `pin_corpus` under Python 3.11):
docstrings differ between Python versions, so the snapshot, not the running interpreter, is the
data. It is split by module, every tenth module (in sorted order) held out. ``--quick`` runs the
same pipeline on a 6-layer random Llama reading UTF-8 bytes.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .._errors import InertiaError
from ..testing import backprop_twin, relative_error
from ._core import ExperimentConfig, ExperimentResult, register
from ._llm_memory import TINY_WIDTH, buffer_bits, momentum_stack, stack_bytes, true_peaks
from ._llm_report import (
    BITS_SEQUENCES,
    FULL,
    GAMMAS,
    MARGIN,
    PARTS,
    QUICK,
    TINY_LAYERS,
    TRAININGS,
    TWIN_TOL,
    Setting,
    paired_ratio,
    plot,
    report,
)
from ._stdlib_corpus import CORPUS, load_corpus, pin_corpus, split

__all__ = [
    "CORPUS",
    "GAMMAS",
    "MARGIN",
    "PARTS",
    "TWIN_TOL",
    "choose_gammas",
    "load_corpus",
    "paired_ratio",
    "pin_corpus",
    "pretrained_llm",
    "split",
]


def pretrained_llm(model: str, seed: int = 0) -> tuple[Any, Callable[[str], list[int]], int]:
    """``(model, encode, eos_id)``: ``"smollm2"``, the pretrained SmolLM2-135M-Instruct and its
    tokenizer; ``"llama-tiny"``, a `TINY_LAYERS`-layer random Llama of its design (seeded) reading
    UTF-8 bytes."""
    from ..models.smollm2 import load_smollm2, tiny_llama

    if model == "smollm2":
        llm, tokenizer = load_smollm2()
        return llm, lambda text: tokenizer(text).input_ids, int(tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return tiny_llama(TINY_LAYERS, TINY_WIDTH), lambda text: list(text.encode()), 0


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


def choose_gammas(
    zero_shot: Mapping[float, tuple[float, float, float]],
) -> tuple[tuple[float, float], str]:
    """The two gammas to fine-tune, ascending, and why in words, from each gamma's zero-shot
    ``(ratio, low, high)`` to the original's perplexity (`paired_ratio`).

    The largest gamma within 5% (the upper end of its 95% CI at most ``1 + MARGIN``: the least
    memory at the quality asked) and the next below it in gamma order. Where no gamma is within
    5%, or only the smallest is, the two smallest: those closest to the original, the likeliest
    that fine-tuning recovers.

    Examples:
        >>> zero_shot = {0.03: (1.0, 1.0, 1.01), 0.1: (1.02, 1.01, 1.04), 0.5: (3.0, 2.8, 3.3)}
        >>> choose_gammas(zero_shot)[0]  # 0.1's interval ends below 1.05, 0.5's above
        (0.03, 0.1)
    """
    gammas = sorted(zero_shot)
    if len(gammas) < 2:
        raise ValueError(f"choosing two gammas needs two; got {gammas}")
    within = [g for g in gammas if zero_shot[g][2] <= 1 + MARGIN]
    if within and max(within) > gammas[0]:
        best = max(within)
        below = gammas[gammas.index(best) - 1]
        return (below, best), (
            f"gamma {best:g}, the largest whose zero-shot perplexity is within 5% of the "
            f"original's, and {below:g}, the next below"
        )
    pair = (gammas[0], gammas[1])
    if within:
        return pair, (
            f"only gamma {pair[0]:g}'s zero-shot perplexity is within 5% of the original's: it "
            f"and the next above, {pair[1]:g}"
        )
    return pair, (
        "no gamma's zero-shot perplexity is within 5% of the original's: the two smallest, "
        f"{pair[0]:g} and {pair[1]:g}, closest to the original"
    )


def _convert(original: Any, gamma: float) -> Any:
    from ..models.smollm2 import LAYERS
    from ..transform import transform_to_momentumnet

    model = transform_to_momentumnet(
        copy.deepcopy(original), LAYERS, keep_first_layer=False, gamma=gamma, inplace=True
    )
    momentum_stack(model)  # memory-free and exact, as its plan chose: raises otherwise
    return model


def _arm(original: Any, gamma: float, training: str, seed: int) -> Any:
    """A fresh copy of the original (gamma 0) or of its conversion at ``gamma``, with LoRA's
    adapters for ``training == "LoRA"`` (seeded: the same adapters in every LoRA arm)."""
    from ..bench import add_lora

    model = _convert(original, gamma) if gamma else copy.deepcopy(original)
    if training == "LoRA":
        torch.manual_seed(seed)
        model = add_lora(model)
    return model


def _optimizer(model: Any, s: Setting, lr: float) -> tuple[torch.optim.Optimizer, Any]:
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)

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
    model: Any,
    data: tuple[Tensor, Tensor, Tensor],
    s: Setting,
    lr: float,
    seed: int,
    twin_checks: bool,
) -> dict[str, Any]:
    """Fine-tune ``model`` for ``s.steps`` steps on ``data = (train, held_out, start)``
    (``start``: the held-out NLL per sequence before training, its zero-shot evaluation); the
    held-out NLL at each evaluation point, the losses, and (``twin_checks``) the comparisons with
    the backprop twin."""
    train, held_out, start_nll = data
    model.config.use_cache = False
    model.train()
    opt, schedule = _optimizer(model, s, lr)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    evals = sorted({round(k * s.steps / s.evals) for k in range(s.evals + 1)})
    out: dict[str, Any] = {"steps": evals, "nll": [start_nll], "losses": [], "twin": {}}
    twin: Any = None
    start = time.perf_counter()
    for step in range(s.steps + 1):
        if step in evals and step > 0:
            out["nll"].append(_nll(model, held_out))
        if step == s.steps:
            break
        ids = train[order[torch.arange(step * s.batch, (step + 1) * s.batch) % len(train)]]
        opt.zero_grad(set_to_none=True)
        if twin_checks and step in (0, s.steps - 1):
            twin = backprop_twin(model)  # the same weights, before this step's update
            if step == 0:  # only the first twin trains; the last one just compares
                twin_opt, twin_schedule = _optimizer(twin, s, lr)
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


def _sweep(
    original: Any, held_out: Tensor, s: Setting, parts: tuple[str, ...], threads: int | None
) -> dict[str, Any]:
    """The zero-shot NLL per held-out sequence of the original (gamma 0) and of each conversion;
    with the sweep part, the buffer's bits, the stack's saved bytes and the true peaks too."""
    memory = "sweep" in parts
    found: dict[str, Any] = {"nll": {0.0: _nll(original, held_out)}, "bits": {}, "saved": {}}
    for gamma in GAMMAS:
        model = _convert(original, gamma)
        found["nll"][gamma] = _nll(model, held_out)
        if memory:
            found["bits"][gamma] = buffer_bits(model, held_out[:BITS_SEQUENCES])
        del model
    found["peaks"] = {}
    if memory:
        found["saved"] = {g: stack_bytes(s.model, s.layers, s.seq, g) for g in (0.0, *GAMMAS)}
        found["peaks"] = true_peaks(s.model, s.layers, s.peak_seq, GAMMAS, threads)
    return found


@register("llm", "8. Fine-tuning a pretrained LLM", plot, parts=PARTS)
def llm_finetuning(config: ExperimentConfig) -> ExperimentResult:
    """The gamma sweep (zero-shot perplexity, buffer bits, saved bytes, true peaks) and the
    fine-tuning of the converted model, full and LoRA, against the original's."""
    s = QUICK if config.quick else FULL
    parts = tuple(p for p in PARTS if p in config.parts) or PARTS
    seed = config.seeds[0]
    corpus = load_corpus()
    train_names, held_names = split(list(corpus))
    original, encode, eos = pretrained_llm(s.model, seed)
    original.config.use_cache = False
    train, _ = _sequences(corpus, train_names, encode, eos, s.seq)
    held_out, modules = _sequences(corpus, held_names, encode, eos, s.seq)
    if s.held_out is not None:  # evenly spaced, so that every held-out module is represented
        keep = torch.linspace(0, len(held_out) - 1, s.held_out).round().long()
        held_out, modules = held_out[keep], [modules[i] for i in keep.tolist()]
    if not config.quick and held_out.numel() < 16_384:
        raise InertiaError(f"only {held_out.numel()} held-out tokens; the experiment needs 16,384")

    start = time.perf_counter()
    d = _sweep(original, held_out, s, parts, config.threads)
    d["seconds"] = {"sweep": time.perf_counter() - start}
    nll = d["nll"]
    d["zero_shot"] = {g: paired_ratio(nll[g], nll[0.0], modules, seed) for g in GAMMAS}
    d["tuned"], d["rule"] = choose_gammas(d["zero_shot"])
    d["runs"], d["final"] = {}, {}
    if "finetune" in parts:
        for training in TRAININGS:
            lr = s.lora_lr if training == "LoRA" else s.lr
            runs = d["runs"].setdefault(training, {})
            for gamma in (0.0, *d["tuned"]):
                model = _arm(original, gamma, training, seed)
                runs[gamma] = _finetune(
                    model, (train, held_out, nll[gamma]), s, lr, seed, twin_checks=gamma > 0
                )
                del model
            d["final"][training] = {
                g: paired_ratio(run["nll"][-1], runs[0.0]["nll"][-1], modules, seed)
                for g, run in runs.items()
                if g > 0
            }
    d["parts"] = parts
    return report(d, s, modules, seed, corpus, (train, held_out), (train_names, held_names))
