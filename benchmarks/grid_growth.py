"""How far each row of a momentum stack's state grows over its blocks: the headroom that a narrow
fixed-point word (int32) needs above a row's largest input value.

A row is one index of the state's first two dimensions (a sample's channel in an image, a sample's
token in a sequence; a sample in a 2-D tensor). For each stack, the momentum update runs in
float32 without autograd, and each row's largest ``|x|`` or ``|v|`` after every block is divided by
that row's largest input value: the worst row's growth and the median row's, at the stack's
worst block. Random weights (nothing is downloaded); torchvision's ResNet-101 in train mode,
converted with ``transform_to_momentumnet(gamma=0.9)``, batch 4 at 112x112; a 12-layer pre-norm
encoder (d_model 256, 4 heads, batch 4, 128 tokens) at gamma 0.9.

Writes benchmarks/results/grid_growth.md; under a minute on a CPU.

    python benchmarks/grid_growth.py
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torchvision
from torch import Tensor

from inertia import MomentumNet, transform_to_momentumnet

OUT = Path(__file__).resolve().parent / "results" / "grid_growth.md"


def _rows(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0] * t.shape[1], -1) if t.dim() >= 3 else t.reshape(t.shape[0], -1)


def growth(net: MomentumNet, x: Tensor) -> tuple[float, float, Tensor]:
    """The worst row's and the median row's largest growth over the momentum blocks of ``net``
    from its momentum input ``x``, and the stack's output."""
    gamma, v = net.gamma, torch.zeros_like(x)
    first = _rows(x).abs().amax(1).clamp_min(1e-30)
    worst, median = 0.0, 0.0
    for block in list(net)[net.keep_first :]:
        f = block(x) if net.is_residual else block(x) - x
        v = gamma * v + (1 - gamma) * f
        x = x + v
        g = torch.maximum(_rows(x).abs().amax(1), _rows(v).abs().amax(1)) / first
        worst, median = max(worst, float(g.max())), max(median, float(g.median()))
    return worst, median, x


@torch.no_grad()
def measure() -> list[tuple[str, int, float, float]]:
    torch.manual_seed(0)
    rows = []
    model = transform_to_momentumnet(torchvision.models.resnet101(), gamma=0.9).train()
    h = model.maxpool(model.relu(model.bn1(model.conv1(torch.randn(4, 3, 112, 112)))))
    for name in ("layer1", "layer2", "layer3", "layer4"):
        stage = getattr(model, name)
        worst, median, h = growth(stage, stage[0](h) if stage.keep_first else h)
        rows.append((f"resnet101.{name}", len(stage) - stage.keep_first, worst, median))
    layer = torch.nn.TransformerEncoderLayer(
        256, 4, 1024, dropout=0.0, batch_first=True, norm_first=True
    )
    encoder = torch.nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)
    stack = MomentumNet(list(encoder.layers), 0.9, is_residual=False)
    rows.append(("encoder12", 12, *growth(stack, torch.randn(4, 128, 256))[:2]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [
        f"Produced by `python benchmarks/grid_growth.py --threads {args.threads}`.",
        "",
        "Largest growth of a row's `|x|` or `|v|` over a stack's momentum blocks, against the "
        "row's largest input value (random weights, gamma 0.9; see the script's docstring).",
        "",
        "| stack | momentum blocks | worst row | median row | bits of headroom (worst) |",
        "|---|---|---|---|---|",
    ]
    for name, blocks, worst, median in measure():
        bits = math.ceil(math.log2(max(worst, 1.0)))
        lines.append(f"| {name} | {blocks} | {worst:.1f}x | {median:.1f}x | {bits} |")
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
