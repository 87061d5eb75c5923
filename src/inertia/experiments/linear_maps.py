"""Experiment 3: momentum networks reach negative linear maps in 1-D; first-order flows do not.

The 1-D ODE ``eps x'' + x' = theta x`` from ``x(0) = 1, x'(0) = 0`` has, with the roots
``r± = (-1 ± sqrt(1 + 4 eps theta)) / (2 eps)`` of ``eps r^2 + r - theta``, the solution

    x(T) = (r+ exp(r- T) - r- exp(r+ T)) / (r+ - r-)

(complex roots for ``theta < -1 / (4 eps)``: ``x(T) = exp(-T / (2 eps)) (cos(w T) + sin(w T) /
(2 eps w))`` with ``w = sqrt(-4 eps theta - 1) / (2 eps)``), while the first-order flow ``x' =
theta x`` gives ``exp(theta T) > 0`` for every theta. The most negative ``x(T) / x(0)`` over theta
is reached at the first trough, ``w T`` a little below pi, and tends to -1 as eps grows.

The discrete network: ``N`` blocks ``f(x) = h theta x`` (``h = T / N``), ``gamma = 1 - h / eps``,
``v_0 = 0`` (which is ``x'(0) = 0``: the network's velocity is ``v = h x'``); see
`inertia.experiments.ode_limit` for why this is a first-order discretization of the ODE. The
ResNet arm is the same network with ``gamma = 0``: ``(1 + h theta)^N``, never negative for even
``N``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ._core import ExperimentConfig, ExperimentResult, Scaled, register, tied_net

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["closed_form_ratio", "linear_maps", "most_negative_ratio"]

T = 1.0
TARGET = -0.3  # the negative ratio both arms are trained to reach
LEARN_EPS = 1.0


class Multiply(nn.Module):
    """``f(x) = theta * x``; ``theta`` a parameter (learned) or a fixed tensor (one per element)."""

    def __init__(self, theta: Tensor, learn: bool = False) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta) if learn else theta

    def forward(self, x: Tensor) -> Tensor:
        return self.theta * x


def closed_form_ratio(theta: Tensor, eps: float, t: float = T) -> Tensor:
    """``x(t) / x(0)`` for ``eps x'' + x' = theta x``, ``x'(0) = 0`` (float64, elementwise)."""
    disc = (1 + 4 * eps * theta.double()).to(torch.complex128)
    r_plus, r_minus = (-1 + disc.sqrt()) / (2 * eps), (-1 - disc.sqrt()) / (2 * eps)
    x = (r_plus * (r_minus * t).exp() - r_minus * (r_plus * t).exp()) / (r_plus - r_minus)
    return x.real


def _thetas(eps: float, points: int) -> Tensor:
    """The oscillating thetas, ``w T`` in ``(0, 4 pi]``: the most negative ratio lies there."""
    w = torch.linspace(4 * math.pi / T / points, 4 * math.pi / T, points, dtype=torch.float64)
    return -(1 + 4 * eps**2 * w**2) / (4 * eps)


def most_negative_ratio(eps: float, points: int = 200_001) -> tuple[float, float]:
    """``(min ratio, argmin theta)`` of the closed form, on a fine grid of oscillating thetas."""
    theta = _thetas(eps, points)
    ratio = closed_form_ratio(theta, eps)
    i = int(ratio.argmin())
    return float(ratio[i]), float(theta[i])


def network_ratio(theta: Tensor, eps: float | None, depth: int) -> Tensor:
    """``x_N / x_0`` of the discrete network for each theta; ``eps=None`` is the ResNet arm."""
    h = T / depth
    gamma = 0.0 if eps is None else 1 - h / eps
    net = tied_net(Scaled(Multiply(theta), h), depth, gamma)
    with torch.no_grad():
        out = net(torch.ones_like(theta))
    assert isinstance(out, Tensor)
    return out


def _learn(seed: int, gamma: float, depth: int, steps: int) -> float:
    """Train ``theta`` so that the network maps ``x`` to ``TARGET * x``; returns the ratio."""
    gen = torch.Generator().manual_seed(seed)
    theta = -2 * torch.rand((), generator=gen, dtype=torch.float64)  # same start in both arms
    x = torch.randn(8, generator=gen, dtype=torch.float64)
    block = Multiply(theta, learn=True)
    net = tied_net(Scaled(block, T / depth), depth, gamma)
    opt = torch.optim.Adam(block.parameters(), lr=0.3)
    for _ in range(steps):
        loss = (net(x) - TARGET * x).square().mean() / x.square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((net(x) / x).mean())


def _plot(result: ExperimentResult, fig: Figure) -> None:
    d = result.data
    left, right = fig.subplots(1, 2)
    eps = d["eps"]
    left.plot(eps, d["closed"], "k-", label="second-order ODE, closed form")
    left.plot(eps, d["network"], "C3o", label=f"momentum network, N = {d['depth']}")
    left.plot(eps, d["resnet"], "C0s", label=f"ResNet (γ = 0), N = {d['depth']}")
    left.plot(eps, [-math.exp(-T / (2 * e)) for e in eps], "k:", label="−exp(−T / 2ε)")
    left.axhline(0, color="C0", linewidth=0.8, label="first-order flow: inf exp(θT) = 0")
    left.set(
        xscale="log",
        xlabel="ε",
        ylabel="most negative x(T) / x(0) over θ",
        title="reachable negative ratios (T = 1)",
    )
    left.legend(fontsize=7)
    theta = d["theta_line"]
    right.plot(theta, d["closed_line"], "k-", label=f"second-order ODE, ε = {LEARN_EPS}")
    right.plot(theta[::25], d["network_line"][::25], "C3o", markersize=3, label="momentum network")
    right.plot(theta, torch.exp(theta * T), "C0--", label="first-order flow exp(θT)")
    right.plot(theta, d["resnet_line"], "C0:", label="ResNet (1 + hθ)^N")
    right.axhline(TARGET, color="gray", linewidth=0.8, label=f"target {TARGET} (trained)")
    right.set(xlabel="θ", ylabel="x(T) / x(0)", ylim=(-1, 1.5), title="ratio against θ")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)


@register("linear-maps", "3. Linear maps in 1-D", _plot)
def linear_maps(config: ExperimentConfig) -> ExperimentResult:
    """Most negative reachable ratio against eps (closed form and network), then training."""
    depth = 200 if config.quick else 1000
    eps_grid = [0.1, 0.3, 1.0, 3.0, 10.0] if config.quick else torch.logspace(-1.3, 1, 12).tolist()
    tol = 0.05 if config.quick else 0.02
    closed, network, resnet, gaps = [], [], [], []
    for eps in eps_grid:
        closed.append(most_negative_ratio(eps)[0])
        theta = _thetas(eps, 2001)
        network.append(float(network_ratio(theta, eps, depth).min()))
        resnet.append(float(network_ratio(theta, None, depth).min()))
        gaps.append(abs(network[-1] - closed[-1]))
    analytic_holds = max(closed) < 0 and max(gaps) <= tol and min(resnet) >= 0
    learn_depth, steps = (50, 150) if config.quick else (100, 300)
    rows: list[tuple[object, ...]] = []
    for seed in config.seeds:
        momentum = _learn(seed, 1 - T / learn_depth / LEARN_EPS, learn_depth, steps)
        plain = _learn(seed, 0.0, learn_depth, steps)
        holds = abs(momentum - TARGET) < 0.01 and plain >= 0
        rows.append((seed, momentum, plain, holds and analytic_holds))
    theta_line = torch.linspace(-40, 2, 1001, dtype=torch.float64)
    data = {
        "eps": eps_grid,
        "closed": closed,
        "network": network,
        "resnet": resnet,
        "depth": depth,
        "theta_line": theta_line,
        "closed_line": closed_form_ratio(theta_line, LEARN_EPS),
        "network_line": network_ratio(theta_line, LEARN_EPS, depth),
        "resnet_line": network_ratio(theta_line, None, depth),
    }
    table = "; ".join(
        f"{e:.3g}: {c:.3f} / {n:.3f}" for e, c, n in zip(eps_grid, closed, network, strict=True)
    )
    return ExperimentResult(
        name="linear-maps",
        claim=(
            "momentum networks (eps x'' + x' = theta x) reach negative ratios x(T)/x(0) in 1-D, "
            "down to about -exp(-T/(2 eps)), so they represent any linear map up to a positive "
            "factor; first-order flows (x' = theta x) only reach exp(theta T) > 0"
        ),
        check=(
            "for every eps, the closed-form most negative ratio is < 0, the discrete momentum "
            f"network's agrees with it within {tol}, and the ResNet arm's (1 + h theta)^N is >= 0; "
            f"trained from the same theta on every seed (eps {LEARN_EPS}, N {learn_depth}), the "
            f"momentum network reaches the ratio {TARGET} within 0.01 and the ResNet stays >= 0."
        ),
        holds=all(r[-1] for r in rows),
        summary=(
            f"closed form <= {max(closed):.2g} at every eps, network within {max(gaps):.1e} of "
            f"it, ResNet >= {min(resnet):.2g}; trained ratio {TARGET} reached within "
            f"{max(abs(float(r[1]) - TARGET) for r in rows):.1e} by momentum, ResNet >= "  # type: ignore[arg-type]
            f"{min(float(r[2]) for r in rows):.3f} ({len(rows)} seeds)"  # type: ignore[arg-type]
        ),
        setup=(
            f"T = {T}, x(0) = 1, x'(0) = 0 (network: v_0 = 0); network N = {depth} blocks "
            f"h theta x, gamma = 1 - h/eps; min over 2001 oscillating thetas (w T in (0, 4 pi]), "
            f"closed form over 200,001. Most negative ratio, closed form / network, by eps: "
            f"{table}. Training: theta one tied parameter, from -2 U(0, 1); Adam, lr 0.3, "
            f"{steps} steps; momentum arm memory-free (gamma {1 - T / learn_depth / LEARN_EPS:g}), "
            "ResNet arm backprop; ratio averaged over 8 random x_0."
        ),
        columns=("seed", "momentum trained ratio", "ResNet trained ratio", "holds"),
        rows=rows,
        data=data,
    )
