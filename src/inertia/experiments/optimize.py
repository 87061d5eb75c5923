"""Experiment 4: learning to optimize; momentum networks converge, undamped RevNets oscillate.

Each block is a gradient step on a least-squares problem ``L(x) = |A x - b|^2 / 2`` given to the
network with its input (``A`` and ``b`` are extra arguments of every block): ``f(x) = -eta A^T
(A x - b)``, with one step size ``eta`` learned, tied over the blocks. Every arm runs

    v_{n+1} = gamma v_n + f(x_n),    x_{n+1} = x_n + v_{n+1}

and the arms differ only in gamma: ``gamma = 0`` is gradient descent (a ResNet), ``0 < gamma <
1`` the heavy-ball method (a momentum network: `MomentumNet` with blocks ``f / (1 - gamma)``,
memory-free), ``gamma = 1`` the RevNet-style update without damping (``v' = v + f(x)``, written
out here: `MomentumNet` at gamma 1 has inert blocks). On a quadratic, the undamped update is a
symplectic (leapfrog) integrator of ``x'' = -grad L(x)``: it keeps an energy and cannot converge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ._core import ExperimentConfig, ExperimentResult, register, states, tied_net

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["GradientStep", "learning_to_optimize", "least_squares"]

ARMS = {"ResNet (γ = 0)": 0.0, "momentum (γ = 0.9)": 0.9, "RevNet (γ = 1, undamped)": 1.0}
MOMENTUM_ARM = "momentum (γ = 0.9)"
REVNET_ARM = "RevNet (γ = 1, undamped)"


@dataclass(frozen=True)
class _Size:
    m: int  # equations
    d: int  # unknowns
    steps: int  # training steps, 64 problems each
    train_depth: int
    max_depth: int


class GradientStep(nn.Module):
    """``f(x) = -scale * eta * A^T (A x - b)`` for a batch: ``x (B, d)``, ``A (B, m, d)``,
    ``b (B, m)``; ``eta = exp(log_eta)`` learned."""

    def __init__(self, scale: float = 1.0, eta: float = 0.1) -> None:
        super().__init__()
        self.scale = scale
        self.log_eta = nn.Parameter(torch.tensor(math.log(eta), dtype=torch.float64))

    def forward(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        residual = torch.einsum("bmd,bd->bm", a, x) - b
        return -self.scale * self.log_eta.exp() * torch.einsum("bmd,bm->bd", a, residual)


def least_squares(n: int, size: _Size, gen: torch.Generator) -> tuple[Tensor, ...]:
    """``n`` random problems: ``A`` Gaussian / sqrt(m), ``b`` Gaussian, the minimizer, and a
    Gaussian starting point ``x_0`` (nonzero: see the report on the inversion check)."""
    a = torch.randn(n, size.m, size.d, generator=gen, dtype=torch.float64) / math.sqrt(size.m)
    b = torch.randn(n, size.m, generator=gen, dtype=torch.float64)
    solution = torch.linalg.lstsq(a, b.unsqueeze(-1)).solution.squeeze(-1)
    x0 = torch.randn(n, size.d, generator=gen, dtype=torch.float64)
    return a, b, solution, x0


def _revnet(block: GradientStep, depth: int, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """States ``x_0 ... x_depth`` of the undamped update ``v' = v + f(x), x' = x + v'``."""
    v, xs = torch.zeros_like(x), [x]
    for _ in range(depth):
        v = v + block(x, a, b)
        x = x + v
        xs.append(x)
    return torch.stack(xs)


def _trajectory(gamma: float, block: GradientStep, depth: int, *problem: Tensor) -> Tensor:
    x, a, b = problem
    if gamma == 1.0:
        return _revnet(block, depth, x, a, b)
    return states(tied_net(block, depth, gamma), x, a, b)


def _distance(xs: Tensor, solution: Tensor, x0: Tensor) -> Tensor:
    """``|x_n - x*| / |x_0 - x*|`` for every depth ``n`` and problem: ``(depth + 1, B)``."""
    distance: Tensor = (xs - solution).norm(dim=-1) / (x0 - solution).norm(dim=-1)
    return distance


def _train(gamma: float, seed: int, size: _Size) -> tuple[GradientStep, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    block = GradientStep(1.0 if gamma == 1.0 else 1 / (1 - gamma))
    opt = torch.optim.Adam(block.parameters(), lr=0.05)
    for _ in range(size.steps):
        a, b, solution, x0 = least_squares(64, size, gen)
        if gamma == 1.0:
            out = _revnet(block, size.train_depth, x0, a, b)[-1]
        else:
            out = tied_net(block, size.train_depth, gamma)(x0, a, b)
        loss = _distance(out, solution, x0).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    a, b, solution, x0 = least_squares(256, size, gen)  # held-out problems
    with torch.no_grad():
        xs = _trajectory(gamma, block, size.max_depth, x0, a, b)
    return block, _distance(xs, solution, x0)


def _plot(result: ExperimentResult, fig: Figure) -> None:
    d = result.data
    left, right = fig.subplots(1, 2, sharey=True)
    for i, (arm, dist) in enumerate(d["distance"].items()):
        depth = torch.arange(dist.shape[0])
        q = dist.quantile(torch.tensor([0.25, 0.5, 0.75], dtype=dist.dtype), dim=1)
        left.plot(depth, q[1], color=f"C{i}", label=arm)
        left.fill_between(depth, q[0], q[2], color=f"C{i}", alpha=0.2)
        right.plot(depth, dist[:, 0], color=f"C{i}", label=arm)
    for ax, title in ((left, "median and quartiles, 256 problems"), (right, "one problem")):
        ax.axvline(d["train_depth"], color="gray", linestyle="--", linewidth=0.8)
        ax.set(yscale="log", xlabel="depth n (block = gradient step)", title=title)
        ax.grid(alpha=0.3)
    left.set_ylabel("|x_n − x*| / |x_0 − x*|")
    left.legend(fontsize=8)


@register("optimize", "4. Learning to optimize", _plot)
def learning_to_optimize(config: ExperimentConfig) -> ExperimentResult:
    """Unrolled gradient steps with a learned step size: distance to the minimizer by depth."""
    size = (
        _Size(m=20, d=10, steps=40, train_depth=20, max_depth=120)
        if config.quick
        else _Size(m=40, d=20, steps=100, train_depth=30, max_depth=150)
    )
    rows, curves = [], {}
    for seed in config.seeds:
        final, eta = {}, {}
        for arm, gamma in ARMS.items():
            torch.manual_seed(seed)
            block, dist = _train(gamma, seed, size)
            median = dist.median(dim=1).values
            final[arm] = (float(median[-1]), float(median[size.max_depth // 2 :].min()))
            eta[arm] = float(block.log_eta.detach().exp())
            if seed == config.seeds[0]:
                curves[arm] = dist
        momentum, revnet = final[MOMENTUM_ARM][0], final[REVNET_ARM][1]
        holds = momentum < 1e-2 and revnet > 0.3
        rows.append(
            (
                seed,
                final["ResNet (γ = 0)"][0],
                momentum,
                final[REVNET_ARM][0],
                revnet,
                *eta.values(),
                holds,
            )
        )
    return ExperimentResult(
        name="optimize",
        claim=(
            "unrolled gradient steps with momentum (a momentum network) converge to the "
            "least-squares minimizer as depth grows; the RevNet-style update without damping "
            "(v' = v + f(x), x' = x + v') oscillates and does not"
        ),
        check=(
            f"at depth {size.max_depth} (trained at depth {size.train_depth}), the momentum arm's "
            "median relative distance to the minimizer is < 0.01, and the RevNet arm's stays > "
            f"0.3 at every depth from {size.max_depth // 2} on, on every seed."
        ),
        holds=all(r[-1] for r in rows),
        summary=(
            f"momentum <= {max(r[2] for r in rows):.1e}, RevNet >= "
            f"{min(r[4] for r in rows):.2f} over the second half, gradient descent <= "
            f"{max(r[1] for r in rows):.1e} ({len(rows)} seeds)"
        ),
        setup=(
            f"Problems: A {size.m}x{size.d} Gaussian / sqrt({size.m}), b Gaussian, x_0 Gaussian; "
            f"one learned step size eta (from 0.1) per arm, tied over {size.train_depth} blocks, "
            f"trained on the mean squared relative distance at depth {size.train_depth}; Adam, lr "
            f"0.05, {size.steps} steps of 64 problems; float64; momentum arms memory-free, "
            f"gradient descent backprop; evaluated on 256 held-out problems up to depth "
            f"{size.max_depth}. Distances: median over problems of |x_n - x*| / |x_0 - x*|."
        ),
        columns=(
            "seed",
            f"ResNet at {size.max_depth}",
            f"momentum at {size.max_depth}",
            f"RevNet at {size.max_depth}",
            f"RevNet min over {size.max_depth // 2}-{size.max_depth}",
            "eta ResNet",
            "eta momentum",
            "eta RevNet",
            "holds",
        ),
        rows=rows,
        data={"distance": curves, "train_depth": size.train_depth},
    )
