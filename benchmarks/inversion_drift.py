"""How far float memory-free gradients drift from backprop, against depth, gamma and dtype.

Blocks Linear(32, 64)-Tanh-Linear(64, 32) at PyTorch's default initialisation, batch 16. For each
cell: the worst relative gradient error over all parameters and the input (memory-free against
backprop, same weights), the drift that `check_inversion` estimates, and ``eps * gamma**-depth``.
Writes benchmarks/results/inversion_drift.{csv,md}; about a minute on 2 CPU cores.

    python benchmarks/inversion_drift.py
"""

from __future__ import annotations

import copy
import csv
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from inertia import InversionWarning, MomentumNet
from inertia.testing import gradient_errors

DEPTHS = (4, 8, 16, 32, 64, 128, 256, 512)
GAMMAS = (0.5, 0.9, 0.99)
DTYPES = (torch.float32, torch.float64)


def cell(depth: int, gamma: float, dtype: torch.dtype) -> tuple[float, float]:
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 32)) for _ in range(depth)]
    backprop = MomentumNet(blocks, gamma).to(dtype)
    free = copy.deepcopy(backprop)
    free.use_backprop, free.inversion_tol = False, 1e-300  # always report the estimate
    x = torch.randn(16, 32, dtype=dtype, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InversionWarning)
        errors = gradient_errors(backprop, free, x)
    match = re.search(r"by about (\S+) ", str(caught[-1].message)) if caught else None
    estimate = float(match.group(1)) if match else 0.0
    worst = max(v for k, v in errors.items() if k != "output")
    return worst, estimate


def main() -> None:
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    rows = []
    for dtype in DTYPES:
        for gamma in GAMMAS:
            for depth in DEPTHS:
                worst, estimate = cell(depth, gamma, dtype)
                predicted = torch.finfo(dtype).eps * gamma**-depth
                rows.append(
                    (str(dtype).removeprefix("torch."), gamma, depth, worst, estimate, predicted)
                )
    with (out / "inversion_drift.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["dtype", "gamma", "depth", "grad_error", "sketch_estimate", "eps_gamma_pow"]
        )
        writer.writerows([r[:3] + tuple(f"{v:.2e}" for v in r[3:]) for r in rows])
    lines = [
        "Produced by `python benchmarks/inversion_drift.py`. Worst relative gradient error of the",
        "float memory-free backward against backprop (the check_inversion estimate in brackets).",
        "",
        "| dtype | gamma | " + " | ".join(f"depth {d}" for d in DEPTHS) + " |",
        "|---|---|" + "---|" * len(DEPTHS),
    ]
    for dtype in DTYPES:
        for gamma in GAMMAS:
            sel = [r for r in rows if r[0] == str(dtype).removeprefix("torch.") and r[1] == gamma]
            cells = " | ".join(f"{r[3]:.0e} [{r[4]:.0e}]" for r in sel)
            lines.append(f"| {sel[0][0]} | {gamma} | {cells} |")
    (out / "inversion_drift.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
