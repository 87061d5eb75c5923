"""Train a deep momentum network memory-free on nested rings, and show the memory it saves.

    python examples/nested_rings.py [--depth 32] [--steps 300]

Prints held-out accuracy and the bytes autograd saved for backward, memory-free against the same
model trained with ordinary backpropagation.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import Tensor, nn

from inertia import MomentumNet
from inertia.testing import SavedTensorMeter


def rings(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Points on 4 nested noisy rings in 2-D; the class alternates from ring to ring."""
    ring = torch.randint(0, 4, (n,), generator=generator)
    angle = 2 * math.pi * torch.rand(n, generator=generator)
    radius = 1.0 + ring + 0.15 * torch.randn(n, generator=generator)
    x = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)
    return x, ring % 2


def make_model(depth: int, width: int, use_backprop: bool) -> nn.Module:
    blocks = [
        nn.Sequential(nn.Linear(width, 2 * width), nn.Tanh(), nn.Linear(2 * width, width))
        for _ in range(depth)
    ]
    return nn.Sequential(
        nn.Linear(2, width),
        MomentumNet(blocks, gamma=0.9, use_backprop=use_backprop),
        nn.Linear(width, 2),
    )


def saved_bytes(model: nn.Module, x: Tensor) -> int:
    """Peak bytes saved for backward over one training step (parameters not counted)."""
    with SavedTensorMeter(ignore=model.parameters()) as meter:
        nn.functional.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long)).backward()
    model.zero_grad(set_to_none=True)
    return meter.peak


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description="Train a momentum network memory-free.")
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x_train, y_train = rings(4096, gen)
    x_test, y_test = rings(1024, gen)  # held out: never trained on
    model = make_model(args.depth, args.width, use_backprop=False)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(args.steps):
        idx = torch.randint(0, len(x_train), (args.batch,), generator=gen)
        loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()

    batch = x_train[: args.batch].clone()  # a view would keep all of x_train's storage alive
    free = saved_bytes(model.train(), batch)
    twin = make_model(args.depth, args.width, use_backprop=True)
    twin.load_state_dict(model.state_dict())
    backprop = saved_bytes(twin, batch)
    print(
        f"held-out accuracy {accuracy:.1%} | depth {args.depth} | bytes saved for backward: "
        f"memory-free {free:,} vs backprop {backprop:,} ({backprop / free:.0f}x less)"
    )
    return {"accuracy": accuracy, "free_bytes": free, "backprop_bytes": backprop}


if __name__ == "__main__":
    main()
