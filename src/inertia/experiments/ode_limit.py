r"""Experiment 7: the momentum network converges to the second-order ODE ``eps x'' + x' = f(x)``.

The mapping, with step ``h = T / N``: blocks output ``h f(x)``, ``gamma = 1 - h / eps``, and the
initial velocity is ``v_0 = h x'(0)``. Then the network's velocity is ``v_n = h u_n`` with ``u_n
~ x'(t_n)``, and its update

```text
v_{n+1} = gamma v_n + (1 - gamma) h f(x_n),   x_{n+1} = x_n + v_{n+1}
```

reads, divided by ``h``, ``u_{n+1} = u_n + (h / eps) (f(x_n) - u_n)`` and ``x_{n+1} = x_n + h
u_{n+1}``: the semi-implicit Euler step of ``x' = u, eps u' = f(x) - u``. It is consistent of
order 1, so the error at ``T`` falls like ``h``. (Blocks scaled by ``h`` are what makes the limit
right: unscaled blocks would integrate ``eps x'' + x' = f(x) / h``, and ``x_{n+1} = x_n + h
v_{n+1}`` with unscaled blocks is the same scheme with ``v = u``.) ``gamma >= 0`` needs ``h <=
eps``.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .._errors import InertiaError
from ._core import ExperimentConfig, ExperimentResult, Scaled, register, states, tied_net

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["discretize", "ode_limit", "solve"]

EPS = 0.5
T = 2.0
D = 2  # dimension of x
BATCH = 8  # initial conditions
RTOL = 1e-8


class Field(nn.Module):
    """A fixed random smooth ``f: R^D -> R^D``, ``W_2 tanh(W_1 x + b_1)`` (16 hidden units)."""

    def __init__(self, gen: torch.Generator) -> None:
        super().__init__()
        self.w1 = 2 * torch.randn(16, D, generator=gen, dtype=torch.float64) / math.sqrt(D)
        self.b1 = torch.randn(16, generator=gen, dtype=torch.float64)
        self.w2 = 2 * torch.randn(D, 16, generator=gen, dtype=torch.float64) / 4

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.w1.T + self.b1) @ self.w2.T


class Constant(nn.Module):
    """The init function ``x_0 -> v_0``: a fixed tensor."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: Tensor) -> Tensor:
        return self.value.expand_as(x)


def discretize(f: nn.Module, depth: int, u0: Tensor) -> nn.Module:
    """The momentum network of ``depth`` blocks for ``eps x'' + x' = f(x)`` on ``[0, T]``."""
    h = T / depth
    if h > EPS:
        raise ValueError(f"gamma = 1 - h/eps < 0: use depth >= T/eps = {T / EPS:g}")
    return tied_net(
        Scaled(f, h), depth, 1 - h / EPS, init_speed=True, init_function=Constant(h * u0)
    )


def solve(f: nn.Module, x0: Tensor, u0: Tensor, t: Tensor, rtol: float = RTOL) -> Tensor:
    """``x(t)``, shape ``(len(t), *x0.shape)``, by torchdiffeq's dopri5 on ``x' = u, eps u' =
    f(x) - u``."""
    try:
        from torchdiffeq import odeint
    except ImportError as err:
        raise InertiaError(
            "the ode-limit experiment needs torchdiffeq: pip install 'inertia[science]'"
        ) from err

    def rhs(_: Tensor, y: Tensor) -> Tensor:
        x, u = y.unbind(0)
        return torch.stack([u, (f(x) - u) / EPS])

    y = odeint(rhs, torch.stack([x0, u0]), t, method="dopri5", rtol=rtol, atol=rtol)
    return y[:, 0]  # type: ignore[no-any-return]


def _slope(hs: list[float], errors: list[float]) -> float:
    """Least-squares slope of log(error) against log(h)."""
    x, y = torch.tensor(hs).log(), torch.tensor(errors).log()
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x * x).sum())


def _plot(result: ExperimentResult, fig: Figure) -> None:
    d = result.data
    left, right = fig.subplots(1, 2)
    left.plot(d["t"], d["reference"], "k-", linewidth=2, alpha=0.4, label="dopri5, rtol 1e-8")
    for i, (depth, xs) in enumerate(d["paths"].items()):
        t = torch.linspace(0, T, depth + 1)
        left.plot(
            t, xs, "o-", markersize=2.5, color=f"C{i}", label=f"momentum network, N = {depth}"
        )
    left.set(xlabel="t", ylabel="x_1(t)", title=f"ε = {EPS}: one trajectory (seed {d['seed']})")
    left.legend(fontsize=8)
    for i, (seed, errors) in enumerate(d["errors"].items()):
        right.loglog(d["h"], errors, "o-", color=f"C{i}", label=f"seed {seed}")
    h = torch.tensor(d["h"])
    scale = d["errors"][d["seed"]][0] / float(h[0])
    right.loglog(h, scale * h, "k--", linewidth=0.8, label="slope 1")
    right.set(xlabel="step h = T / N", ylabel="max |x_N − x(T)|", title="error at T")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)


@register("ode-limit", "7. Second-order ODE limit", _plot)
def ode_limit(config: ExperimentConfig) -> ExperimentResult:
    """Error at ``T`` against the step, for a random smooth ``f`` and initial state per seed."""
    depths = [16, 32, 64, 128, 256] if config.quick else [16, 32, 64, 128, 256, 512, 1024, 2048]
    hs = [T / n for n in depths]
    rows = []
    data: dict[str, Any] = {"h": hs, "errors": {}, "paths": {}, "seed": config.seeds[0]}
    end = torch.tensor([0.0, T], dtype=torch.float64)
    for seed in config.seeds:
        gen = torch.Generator().manual_seed(seed)
        f = Field(gen)
        x0 = torch.randn(BATCH, D, generator=gen, dtype=torch.float64)
        u0 = torch.randn(BATCH, D, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            exact = solve(f, x0, u0, end)[-1]
            finer = solve(f, x0, u0, end, rtol=1e-11)[-1]
            errors = []
            for depth in depths:
                xs = states(discretize(f, depth, u0), x0)  # type: ignore[arg-type]
                errors.append(float((xs[-1] - exact).abs().max()))
                if seed == config.seeds[0] and depth in (16, 128):
                    data["paths"][depth] = xs[:, 0, 0]
            if seed == config.seeds[0]:
                data["t"] = torch.linspace(0, T, 201, dtype=torch.float64)
                data["reference"] = solve(f, x0, u0, data["t"])[:, 0, 0]
        slope = _slope(hs, errors)
        monotone = all(b < a for a, b in itertools.pairwise(errors))
        reference_error = float((finer - exact).abs().max())
        data["errors"][seed] = errors
        holds = 0.8 <= slope <= 1.2 and monotone and reference_error < 0.01 * errors[-1]
        rows.append((seed, *errors, slope, reference_error, holds))
    return ExperimentResult(
        name="ode-limit",
        claim=(
            "with h = T/N, gamma = 1 - h/eps and blocks scaled by h, the momentum network "
            "converges to the solution of eps x'' + x' = f(x) as N grows, with an error falling "
            "like h"
        ),
        check=(
            "on every seed, the error at T falls at every refinement, the least-squares slope of "
            "log(error) against log(h) lies in [0.8, 1.2], and dopri5's own error (against rtol "
            "1e-11) is below 1% of the finest network's."
        ),
        holds=all(r[-1] for r in rows),
        summary=(
            f"slopes {', '.join(f'{r[-3]:.3f}' for r in rows)}; error at N = {depths[-1]} <= "
            f"{max(r[len(depths)] for r in rows):.1e} ({len(rows)} seeds)"
        ),
        setup=(
            f"f(x) = W_2 tanh(W_1 x + b_1), x in R^{D}, 16 hidden units, random per seed; eps "
            f"{EPS}, T {T}, {BATCH} initial states x(0), x'(0) standard normal; network v_0 = h "
            f"x'(0) (init_function), N in {depths}; float64. Reference: torchdiffeq dopri5, rtol "
            f"= atol = {RTOL:g}. Error: max over initial states and coordinates of |x_N - x(T)|."
        ),
        columns=(
            "seed",
            *(f"error N={n}" for n in depths),
            "slope",
            "dopri5 error",
            "holds",
        ),
        rows=rows,
        data=data,
    )
