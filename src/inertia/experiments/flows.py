"""Experiments 1 and 2: what momentum adds to a small-step residual network.

Both use one block ``f`` (an MLP) tied over ``N = 15`` layers, its output scaled by ``1/N``, so
that the ResNet arm (``gamma = 0``: ``x_{n+1} = x_n + f(x_n) / N``) is the explicit Euler
discretization of the first-order flow ``x' = f(x)`` on ``[0, 1]``. The momentum arm is the same
network with ``gamma = 0.99``. A first-order flow is a homeomorphism that keeps the order of points
on a line and the nesting of closed curves in the plane; the momentum network's state ``(x, v)``
evolves in twice the dimension, so its ``x`` is free of both constraints.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ._core import ExperimentConfig, ExperimentResult, Scaled, register, states, tied_net

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["crossing", "nested_rings", "rings"]

DEPTH = 15
MOMENTUM = 0.99  # the paper's gamma for both figures
HIDDEN = 16
LR = 0.05


@dataclass(frozen=True)
class _Size:
    steps: int
    points: int  # training points (rings: also held-out points)


def _mlp(d: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, d))


def _fit(model: nn.Module, loss_of: Any, steps: int) -> float:
    """Full-batch Adam; returns the last loss."""
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loss = torch.zeros(())
    for _ in range(steps):
        loss = loss_of(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach())


# --- 1. crossing trajectories ---------------------------------------------------------------


def _plot_crossing(result: ExperimentResult, fig: Figure) -> None:
    d = result.data
    axes = fig.subplots(1, 3)
    depth = range(DEPTH + 1)
    for ax, key, title in zip(
        axes[:2],
        ("resnet", "momentum"),
        ("ResNet, γ = 0", f"momentum, γ = {MOMENTUM}"),
        strict=True,
    ):
        paths = d[f"{key}_states"]
        for j in range(paths.shape[1]):
            ax.plot(paths[:, j], depth, "-o", markersize=2.5, color=f"C{j % 10}")
        ax.set(xlabel="x", ylabel="layer n", title=f"{title}: trajectories", xlim=(-1.6, 1.6))
        ax.invert_yaxis()
        ax.grid(alpha=0.3)
    ax = axes[2]
    x = d["x"]
    ax.plot(x, -(x**3), "k-", linewidth=3, alpha=0.3, label="target −x³")
    ax.plot(x, d["resnet_out"], "C0--", label=f"ResNet (MSE {d['resnet_mse']:.3f})")
    ax.plot(x, d["momentum_out"], "C3-", label=f"momentum (MSE {d['momentum_mse']:.1e})")
    ax.set(xlabel="x_0", ylabel="x_N", title="learned map (seed 0)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


@register("crossing", "1. Crossing trajectories: x -> -x^3", _plot_crossing, panels=3)
def crossing(config: ExperimentConfig) -> ExperimentResult:
    """Learn ``x -> -x**3`` on ``[-1, 1]``: momentum crosses trajectories, the ResNet cannot.

    A map that reverses the order of points needs trajectories that cross. The ResNet arm cannot,
    as long as its step map ``x + f(x) / N`` stays increasing (the discretized flow): then any
    depth of it is increasing, and the best increasing fit of a decreasing target is a constant,
    whose mean squared error is ``mean(x**6)``. The table reports whether the learned step map
    stayed increasing.
    """
    size = _Size(steps=300 if config.quick else 1000, points=64)
    x = torch.linspace(-1, 1, size.points).unsqueeze(1)
    target = -(x**3)
    floor = float(target.square().mean())
    rows, data = [], dict[str, Any]()
    for seed in config.seeds:
        mse, increasing = {}, True
        for key, gamma in (("momentum", MOMENTUM), ("resnet", 0.0)):
            torch.manual_seed(seed)  # both arms start from the same weights
            block = Scaled(_mlp(1), 1 / DEPTH)
            net = tied_net(block, DEPTH, gamma)
            _fit(net, lambda m: (m(x) - target).square().mean(), size.steps)
            with torch.no_grad():
                out = net(x)
                mse[key] = float((out - target).square().mean())
                if key == "resnet":
                    grid = torch.linspace(-1.5, 1.5, 1001).unsqueeze(1)
                    increasing = bool((grid + block(grid)).diff(dim=0).gt(0).all())
            if seed == config.seeds[0]:
                data[f"{key}_states"] = states(net, torch.linspace(-1, 1, 9).unsqueeze(1))[..., 0]
                data[f"{key}_out"], data[f"{key}_mse"] = out[:, 0], mse[key]
        ratio = mse["resnet"] / mse["momentum"]
        rows.append((seed, mse["momentum"], mse["resnet"], ratio, increasing, ratio > 10))
    data["x"] = x[:, 0]
    worst = min(r[3] for r in rows)
    return ExperimentResult(
        name="crossing",
        claim=(
            "a momentum network (gamma 0.99) learns x -> -x^3 on [-1, 1], whose trajectories must "
            "cross; the ResNet (gamma 0), a discretized first-order flow, cannot"
        ),
        check="momentum's mean squared error is below 0.1 x the ResNet's, on every seed.",
        holds=all(r[-1] for r in rows),
        summary=(
            f"ResNet MSE / momentum MSE >= {worst:.0f} on {len(rows)} seeds (momentum MSE <= "
            f"{max(r[1] for r in rows):.1e}, ResNet >= {min(r[2] for r in rows):.3f}; any "
            f"increasing map has MSE >= mean(x^6) = {floor:.3f})"
        ),
        setup=(
            f"One block Linear(1, {HIDDEN})-Tanh-Linear({HIDDEN}, 1) tied over {DEPTH} layers, "
            f"output scaled by 1/{DEPTH}, v_0 = 0; {size.points} points evenly spaced on [-1, 1]; "
            f"full-batch Adam, lr {LR}, {size.steps} steps; momentum arm memory-free, ResNet arm "
            "backprop. 'step map increasing': x + f(x)/15 increasing on [-1.5, 1.5], i.e. the "
            "ResNet stayed a discretized flow."
        ),
        columns=(
            "seed",
            "momentum MSE",
            "ResNet MSE",
            "ResNet / momentum",
            "ResNet step map increasing",
            "holds",
        ),
        rows=rows,
        data=data,
    )


# --- 2. nested rings ------------------------------------------------------------------------


def rings(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` points on 4 nested noisy rings of radii 0.25, 0.5, 0.75, 1; the class alternates."""
    ring = torch.randint(0, 4, (n,), generator=generator)
    angle = 2 * math.pi * torch.rand(n, generator=generator)
    radius = (1.0 + ring + 0.15 * torch.randn(n, generator=generator)) / 4
    return torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1), ring % 2


def _cross_entropy(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(model(x), y)


def _folded(block: nn.Module, xs: Tensor) -> float:
    """Share of the states ``xs`` (any leading shape, last dim 2) where ``x + block(x)`` folds."""
    points = xs.reshape(-1, 2)
    jacobian = torch.func.vmap(torch.func.jacrev(lambda p: p + block(p)))(points)
    return float(torch.linalg.det(jacobian).le(0).float().mean())


def _plot_rings(result: ExperimentResult, fig: Figure) -> None:
    d = result.data
    axes = fig.subplots(1, 3)
    panels = (
        ("x", "input (held-out points)", None),
        ("resnet_out", f"ResNet, γ = 0: x_N ({d['resnet_acc']:.0%})", d["resnet_head"]),
        (
            "momentum_out",
            f"momentum, γ = {MOMENTUM}: x_N ({d['momentum_acc']:.0%})",
            d["momentum_head"],
        ),
    )
    y = d["y"]
    for ax, (key, title, head) in zip(axes, panels, strict=True):
        pts = d[key]
        for c in (0, 1):
            ax.scatter(pts[y == c, 0], pts[y == c, 1], s=3, color=f"C{c}", label=f"class {c}")
        if head is not None:  # the linear classifier's boundary: (w_1 - w_0) . x + b_1 - b_0 = 0
            w, b = head
            (a, c), off = (w[1] - w[0]).tolist(), float(b[1] - b[0])
            lo, hi = float(pts[:, 0].min()), float(pts[:, 0].max())
            if abs(c) > 1e-9:
                xs = torch.linspace(lo, hi, 2)
                ax.plot(xs, -(a * xs + off) / c, "k--", linewidth=1, label="classifier boundary")
                ax.set_ylim(float(pts[:, 1].min()) - 0.1, float(pts[:, 1].max()) + 0.1)
        ax.set(title=title, aspect="equal" if head is None else "auto")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, markerscale=3)


@register("rings", "2. Nested rings", _plot_rings, panels=3)
def nested_rings(config: ExperimentConfig) -> ExperimentResult:
    """Separate 4 nested rings (2 alternating classes) in 2-D with a linear classifier on ``x_N``.

    A first-order flow of the plane keeps each ring inside the next, so no line separates the
    classes of its output; the momentum network's ``x_N`` is not bound by that.
    """
    size = _Size(steps=600 if config.quick else 1000, points=1024)
    rows, data = [], dict[str, Any]()
    for seed in config.seeds:
        gen = torch.Generator().manual_seed(seed)
        x_train, y_train = rings(size.points, gen)
        x_test, y_test = rings(size.points, gen)  # held out
        acc, folded = {}, math.nan
        for key, gamma in (("momentum", MOMENTUM), ("resnet", 0.0)):
            torch.manual_seed(seed)
            net = tied_net(Scaled(_mlp(2), 1 / DEPTH), DEPTH, gamma)
            head = nn.Linear(2, 2)
            model = nn.Sequential(net, head)
            _fit(model, functools.partial(_cross_entropy, x=x_train, y=y_train), size.steps)
            with torch.no_grad():
                acc[key] = float((model(x_test).argmax(1) == y_test).float().mean())
            if seed == config.seeds[0]:
                data[f"{key}_out"] = states(net, x_test)[-1]
                data[f"{key}_head"] = (head.weight.detach(), head.bias.detach())
                data[f"{key}_acc"] = acc[key]
                data["x"], data["y"] = x_test, y_test
            if key == "resnet":
                folded = _folded(net[0], states(net, x_test))
        gap = acc["momentum"] - acc["resnet"]
        # The ResNet's accuracy is chaotic in the training's rounding (seeds 0-2 at quick size:
        # 54% to 80% depending only on which vector kernels the CPU runs), momentum's is not
        # (92% to 98%): the margin asked for is one that every such run clears.
        holds = acc["momentum"] >= 0.9 and gap >= 0.1
        rows.append((seed, acc["momentum"], acc["resnet"], gap, folded, holds))
    return ExperimentResult(
        name="rings",
        claim=(
            "a momentum network (gamma 0.99) separates 4 nested rings of alternating classes in "
            "2-D; the ResNet (gamma 0), a discretized first-order flow of the plane, does not"
        ),
        check=(
            "momentum's held-out accuracy is at least 90% and exceeds the ResNet's by at least 10 "
            "points, on every seed."
        ),
        holds=all(r[-1] for r in rows),
        summary=(
            f"gap >= {min(r[3] for r in rows):.1%} on {len(rows)} seeds (momentum >= "
            f"{min(r[1] for r in rows):.1%}, ResNet <= {max(r[2] for r in rows):.1%})"
        ),
        setup=(
            f"One block Linear(2, {HIDDEN})-Tanh-Linear({HIDDEN}, 2) tied over {DEPTH} layers, "
            f"output scaled by 1/{DEPTH}, v_0 = 0, then Linear(2, 2) on x_N; {size.points} "
            f"training and {size.points} held-out points, ring radii 0.25-1 with noise 0.0375; "
            f"full-batch Adam, lr {LR}, {size.steps} steps, cross-entropy; momentum arm "
            "memory-free, ResNet arm backprop. 'step map folded': share of the ResNet's visited "
            "states (held-out points, every layer) where x + f(x)/15 has a Jacobian determinant "
            "<= 0, i.e. where it stopped being a discretized flow."
        ),
        columns=(
            "seed",
            "momentum accuracy",
            "ResNet accuracy",
            "gap",
            "ResNet step map folded",
            "holds",
        ),
        rows=rows,
        data=data,
    )
