"""Exact mode against gamma and depth: its buffer, and how far its forward is from the float one.

1. For each gamma and depth, runs an exact `MomentumNet` of cheap blocks and reads the buffer off
   the returned `ExactState`: bits per element, bits per element per block against the
   information-theoretic floor ``log2(1 / gamma)`` (what multiplying by gamma destroys), and the
   buffer's bytes as a fraction of what storing every block's activation would take (float32).
2. The end-to-end deviation of the exact forward (each block's contribution rounded onto the
   grid) from the plain float64 forward of the same blocks, against depth.

Writes benchmarks/results/exact_mode.{csv,md}; about a minute.

    python benchmarks/exact_mode.py
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from inertia import MomentumNet
from inertia.bench import write_dict_rows

GAMMAS = (0.1, 0.5, 0.9, 0.99)
DEPTHS = (64, 256, 1024, 4096)


class Wave(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(()))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.a * x)


def measure(gamma: float, depth: int, numel: int = 1024) -> dict[str, float]:
    net = MomentumNet([Wave() for _ in range(depth)], gamma, use_backprop=False, exact=True)
    with torch.no_grad():
        state = net(torch.randn(numel), return_state=True)
    bits = 8 * state.nbytes / numel
    floor = math.log2(1 / gamma)
    return {
        "gamma": gamma,
        "depth": depth,
        "buffer_bits_per_element": bits,
        "bits_per_element_per_block": bits / depth,
        "floor_bits_per_block": floor,
        "excess_over_floor_bits": bits - depth * floor,
        "fraction_of_activations": bits / (32 * depth),
    }


def deviation(gamma: float, depth: int, dtype: torch.dtype) -> float:
    """Relative distance of the exact forward's output from the plain float64 forward's, for
    Linear(8, 16)-Tanh-Linear(16, 8) blocks (PyTorch's default initialization), batch 128."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8)) for _ in range(depth)]
    exact = MomentumNet(blocks, gamma, exact=True).to(dtype)
    x = torch.randn(128, 8, dtype=dtype)
    with torch.no_grad():  # the fixed-point state: under no_grad a plain forward runs floats
        out = exact(x, return_state=True).position.double()
        exact.exact = False
        reference = exact.double()(x.double())
    return float((out - reference).norm() / reference.norm())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    rows = [measure(g, d) for g in GAMMAS for d in DEPTHS]
    for r in rows:
        for dtype in (torch.float32, torch.float64):
            r[f"deviation_{str(dtype)[6:]}"] = deviation(r["gamma"], int(r["depth"]), dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    write_dict_rows(rows, args.out / "exact_mode.csv")
    lines = [
        "# Exact mode against gamma and depth",
        "",
        "Command: `python benchmarks/exact_mode.py`. The buffer is read off the `ExactState` of "
        "real forwards (blocks `tanh(a x)`, 1,024 elements): one int64 per element plus 32-bit "
        "word planes. The floor is `log2(1/gamma)` bits per element per "
        "block, the information that multiplying by gamma destroys. *vs activations*: the "
        "buffer's bytes over those of every block's float32 activation, which plain backprop "
        "would store. *deviation*: relative distance of the exact forward's output from the plain "
        "float64 forward of the same blocks, Linear(8, 16)-Tanh-Linear(16, 8) with PyTorch's "
        "default initialization, batch 128 (the default grid: step `2**-32` for float32, "
        "`2**-40` for float64, times the binary magnitude of the input's largest element; the "
        "float32 figure includes float32's own rounding inside the blocks).",
        "",
        "| gamma | depth | buffer bits/element | bits/element/block | floor | above floor (bits) "
        "| vs activations | deviation, float32 | deviation, float64 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['gamma']} | {r['depth']:,} | {r['buffer_bits_per_element']:,.0f} "
            f"| {r['bits_per_element_per_block']:.3f} | {r['floor_bits_per_block']:.3f} "
            f"| {r['excess_over_floor_bits']:.0f} | {r['fraction_of_activations']:.2%} "
            f"| {r['deviation_float32']:.1e} | {r['deviation_float64']:.1e} |"
        )
    (args.out / "exact_mode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
