"""`choose_gamma`: the largest gamma whose converted model scores within the tolerance."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from torch import nn

from inertia import GammaChoice, InertiaError, MomentumLayerList, choose_gamma
from inertia import transform_to_momentumnet as convert

transformers = pytest.importorskip("transformers")


IDS = (torch.arange(4 * 24).reshape(4, 24) * 7) % 199 + 1  # a pattern the model learns


@functools.cache
def _trained() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    model.config.use_cache = False
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        optimizer.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
    return model.eval()


def llama() -> nn.Module:
    """A small Llama trained on `IDS`: it has a function to keep (perplexity near 1, against
    the vocabulary's 200 for random weights)."""
    return copy.deepcopy(_trained())


def perplexity(model: nn.Module) -> float:
    with torch.no_grad():
        return math.exp(float(model(input_ids=IDS, labels=IDS).loss))


@pytest.mark.parametrize("tolerance", [1e-3, 0.05])
def test_it_keeps_the_largest_gamma_within_the_tolerance(tolerance: float) -> None:
    """On a Llama, every gamma tried before the one chosen scores worse than the tolerance
    allows, the chosen one within it, and its score is that of the model converted by hand at
    that gamma; the model itself is left unconverted."""
    model = llama()
    before = copy.deepcopy(model.state_dict())
    choice = choose_gamma(
        model,
        "model.layers",
        perplexity,
        tolerance=tolerance,
        gammas=(0.01, 0.9, 0.5, 0.1),
        keep_first_layer=False,
    )
    assert isinstance(choice, GammaChoice)
    tried = list(choice.scores)
    assert tried == sorted(tried, reverse=True)
    assert tried[-1] == choice.gamma
    assert choice.original == perplexity(model)
    assert choice.ratio(choice.gamma) <= 1 + tolerance
    assert all(choice.ratio(g) > 1 + tolerance for g in tried[:-1])
    by_hand = convert(copy.deepcopy(model), "model.layers", False, gamma=choice.gamma)
    assert isinstance(by_hand.model.layers, MomentumLayerList)
    assert perplexity(by_hand) == choice.scores[choice.gamma]
    assert choice.buffer_bits == pytest.approx(math.log2(1 / choice.gamma))
    assert not isinstance(model.model.layers, MomentumLayerList)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_a_tighter_tolerance_takes_a_smaller_gamma() -> None:
    """The ratio to the original grows with gamma here, so 1e-3 must go further down than 0.05;
    the conversion's arguments reach every copy (the first layer kept changes the scores)."""
    loose = choose_gamma(llama(), "model.layers", perplexity, keep_first_layer=False)
    tight = choose_gamma(
        llama(), "model.layers", perplexity, tolerance=1e-3, keep_first_layer=False
    )
    assert tight.gamma < loose.gamma
    kept = choose_gamma(llama(), "model.layers", perplexity, tolerance=1e-3)
    assert kept.scores[0.9] != tight.scores[0.9]


def test_no_gamma_within_the_tolerance_is_an_error() -> None:
    with pytest.raises(InertiaError, match=r"No gamma keeps the model within 0% .*gamma 0\.9: "):
        choose_gamma(llama(), "model.layers", perplexity, tolerance=0.0, gammas=(0.9,))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tolerance": -0.1}, "tolerance=-0.1; it is a fraction"),
        ({"tolerance": math.nan}, "tolerance=nan"),
        ({"gammas": ()}, r"gammas=\(\); give one or more in \(0, 1\)"),
        ({"gammas": (0.5, 1.0)}, r"gammas=\(0.5, 1.0\)"),
        ({"gammas": (0.0,)}, r"gamma 0 is the original"),
        ({"gamma": 0.5}, "choose_gamma sets gamma itself"),
        ({"inplace": True}, "choose_gamma sets inplace itself"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        choose_gamma(nn.Sequential(nn.Linear(2, 2)), "0", lambda m: 1.0, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("score", [math.nan, 0.0, -1.0, math.inf])
def test_a_score_that_is_no_ratio_is_refused(score: float) -> None:
    with pytest.raises(InertiaError, match="positive finite score, such as perplexity"):
        choose_gamma(nn.Sequential(nn.Linear(2, 2)), "0", lambda m: score)
