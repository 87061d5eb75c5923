"""`choose_gamma`: the largest gamma at which a converted pretrained model keeps its function."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ._errors import InertiaError
from .transform import transform_to_momentumnet

__all__ = ["GAMMAS", "GammaChoice", "choose_gamma"]

#: The gammas `choose_gamma` tries, largest first: those of ``inertia experiment llm``.
GAMMAS = (0.9, 0.5, 0.3, 0.1, 0.03, 0.01)


@dataclass(frozen=True)
class GammaChoice:
    """What `choose_gamma` found.

    Attributes:
        gamma: The largest gamma tried whose converted model scored within the tolerance.
        original: The original model's score.
        scores: The score of the model converted at each gamma tried, in the order tried (each
            larger gamma than ``gamma`` failed; smaller ones were not tried).
    """

    gamma: float
    original: float
    scores: dict[float, float]

    @property
    def buffer_bits(self) -> float:
        """What ``gamma`` costs in exact mode's backward: the buffer's bits per element of the
        stack's activation, per block (``log2(1 / gamma)``)."""
        return math.log2(1 / self.gamma)

    def ratio(self, gamma: float) -> float:
        """The converted model's score at ``gamma`` over the original's."""
        return self.scores[gamma] / self.original


def choose_gamma(
    model: nn.Module,
    residual_layers: Sequence[str] | str | None,
    evaluate: Callable[[nn.Module], float],
    *,
    tolerance: float = 0.05,
    gammas: Sequence[float] = GAMMAS,
    **conversion: Any,
) -> GammaChoice:
    """The largest of ``gammas`` at which ``model``, converted, keeps its function: ``evaluate``
    of the converted model at most ``1 + tolerance`` times the original's.

    Converting a pretrained model at ``gamma > 0`` changes the function it computes, more as gamma
    grows; a smaller gamma costs more memory in exact mode's backward (`GammaChoice.buffer_bits`).
    This converts a copy of ``model`` at each gamma, largest first, and stops at the first that
    scores within the tolerance; ``model`` itself is left as it is.

    Args:
        model: The pretrained model, unconverted.
        residual_layers: Its stacks, as for `transform_to_momentumnet`.
        evaluate: Scores a model, lower is better, on held-out data: perplexity (not the loss,
            its logarithm: the tolerance is a ratio of scores). Called once on ``model`` and
            once per gamma tried, on a converted copy.
        tolerance: How much worse than the original's the converted model may score.
        gammas: The gammas to try, each in (0, 1); tried largest first.
        **conversion: Further arguments of `transform_to_momentumnet` (``keep_first_layer``,
            ``exact``, ...), used for every gamma.

    Returns:
        The gamma chosen, with every score computed.

    Raises:
        InertiaError: No gamma keeps the function within the tolerance (the error gives each
            score), or the original's score is not a positive finite number.
        ValueError: ``tolerance`` is negative, ``gammas`` is empty or holds a value outside
            (0, 1), or ``conversion`` sets ``gamma`` or ``inplace``.

    Examples:
        >>> import torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> blocks = [nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(4)]
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(*blocks))
        >>> x = torch.randn(64, 8)
        >>> target = model(x).detach()
        >>> def evaluate(m: nn.Module) -> float:  # 1 + mean square distance to the original
        ...     with torch.no_grad():
        ...         return 1 + float(((m(x) - target) ** 2).mean())
        >>> choice = choose_gamma(model, "1", evaluate, tolerance=0.01, keep_first_layer=False)
        >>> scores = [round(s, 3) for s in choice.scores.values()]
        >>> choice.gamma, round(choice.buffer_bits, 2), scores
        (0.1, 3.32, [1.064, 1.05, 1.02, 1.004])
    """
    if not tolerance >= 0:
        raise ValueError(f"tolerance={tolerance!r}; it is a fraction of the score, 0 or more.")
    order = sorted(gammas, reverse=True)
    if not order or not all(0 < g < 1 for g in order):
        raise ValueError(
            f"gammas={tuple(gammas)!r}; give one or more in (0, 1) (gamma 0 is the original)."
        )
    clash = {"gamma", "inplace"} & set(conversion)
    if clash:
        raise ValueError(
            f"choose_gamma sets {', '.join(sorted(clash))} itself; leave it out of the arguments."
        )
    original = float(evaluate(model))
    if not (math.isfinite(original) and original > 0):
        raise InertiaError(
            f"evaluate(model) gave {original!r}; choose_gamma compares ratios of scores, so it "
            "needs a positive finite score, such as perplexity."
        )
    scores: dict[float, float] = {}
    for gamma in order:
        converted = transform_to_momentumnet(
            copy.deepcopy(model), residual_layers, gamma=gamma, inplace=True, **conversion
        )
        scores[gamma] = float(evaluate(converted))
        del converted
        if scores[gamma] <= original * (1 + tolerance):
            return GammaChoice(gamma, original, scores)
    tried = ", ".join(f"gamma {g}: {s / original:.4g}x" for g, s in scores.items())
    raise InertiaError(
        f"No gamma keeps the model within {tolerance:.0%} of its score ({original:.6g}): {tried}. "
        "Try smaller gammas, a larger tolerance, or fine-tune after converting."
    )
