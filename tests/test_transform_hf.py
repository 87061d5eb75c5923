"""transform_to_momentumnet on HuggingFace transformers (BERT, GPT-2, Llama) and a timm ViT."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from inertia import MomentumLayerList, MomentumNet, transform_to_momentumnet
from inertia.testing import TOLERANCES, assert_gradients_match, relative_error

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

F64 = torch.float64


def bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    return transformers.BertModel(config, add_pooling_layer=False)


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=3,
        n_embd=32,
        n_head=2,
        vocab_size=100,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        attention_dropout=0.1,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


def vit() -> nn.Module:
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=3,
        num_heads=2,
        num_classes=10,
        drop_rate=0.1,
        proj_drop_rate=0.1,
        attn_drop_rate=0.1,
    )


# (constructor, stack path, class of the converted stack)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], str, type]] = {
    "bert": (bert, "encoder.layer", MomentumLayerList),
    "gpt2": (gpt2, "transformer.h", MomentumLayerList),
    "llama": (llama, "model.layers", MomentumLayerList),
    "vit": (vit, "blocks", MomentumNet),
}


def example(name: str) -> tuple[Any, ...]:
    """Inputs of the family (a padded batch for the language models)."""
    if name == "vit":
        return (torch.randn(4, 3, 32, 32),)
    ids = torch.randint(1, 100, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, -3:] = 0
    return ids, mask


class Output(nn.Module):
    """The model's main output as one tensor (gradient_errors compares tensors)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: Tensor) -> Tensor:
        if len(inputs) == 1:
            return self.model(inputs[0])  # type: ignore[no-any-return]
        out = self.model(input_ids=inputs[0], attention_mask=inputs[1], use_cache=False)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state  # type: ignore[no-any-return]


def convert(name: str, model: nn.Module, **kwargs: Any) -> nn.Module:
    options = {"keep_first_layer": False, "gamma": 0.9, "method": "memory_free", **kwargs}
    return transform_to_momentumnet(model, FAMILIES[name][1], **options)


@pytest.mark.parametrize("name", FAMILIES)
def test_structure_and_weights(name: str) -> None:
    make, path, cls = FAMILIES[name]
    model = make()
    converted = convert(name, model)
    stack = converted.get_submodule(path)
    assert type(stack) is cls
    assert len(stack) == 3
    assert list(converted.state_dict()) == list(model.state_dict())
    assert sum(p.numel() for p in converted.parameters()) == sum(
        p.numel() for p in model.parameters()
    )
    model.load_state_dict(converted.state_dict(), strict=True)
    converted.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name", FAMILIES)
def test_gamma_zero_is_the_original(name: str, train: bool) -> None:
    model = FAMILIES[name][0]().double().train(train)
    converted = convert(name, model, gamma=0.0, use_backprop=True).train(train)
    inputs = [t.double() if t.is_floating_point() else t for t in example(name)]
    torch.manual_seed(1)
    expected = Output(model)(*inputs)
    torch.manual_seed(1)
    assert relative_error(Output(converted)(*inputs), expected) <= TOLERANCES[F64]


@pytest.mark.parametrize("name", FAMILIES)
def test_gamma_point_nine_is_a_momentum_loop(name: str) -> None:
    """Train mode, dropout on: the converted stack computes the momentum loop over the original
    layers, called with the arguments the parent gives them (captured with a hook)."""
    _, path, _ = FAMILIES[name]
    model = FAMILIES[name][0]().double().train()
    converted = convert(name, model, use_backprop=True)
    inputs = [t.double() if t.is_floating_point() else t for t in example(name)]
    layers = list(model.get_submodule(path))
    seen: dict[str, Any] = {}

    def capture(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.setdefault("call", (args, kwargs, torch.get_rng_state()))

    handle = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    torch.manual_seed(2)
    Output(model)(*inputs)
    handle.remove()
    (x, *args), kwargs, rng = seen["call"]
    torch.set_rng_state(rng)
    v = torch.zeros_like(x)
    for layer in layers:
        v = 0.9 * v + (1 - 0.9) * (layer(x, *args, **kwargs) - x)
        x = x + v
    got: dict[str, Tensor] = {}
    converted.get_submodule(path).register_forward_hook(lambda m, i, o: got.setdefault("out", o))
    torch.manual_seed(2)
    Output(converted)(*inputs)
    assert relative_error(got["out"], x) <= TOLERANCES[F64]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", FAMILIES)
def test_memory_free_gradients_match(name: str, dtype: torch.dtype) -> None:
    model = FAMILIES[name][0]().to(dtype).train()
    backprop = Output(convert(name, model, use_backprop=True))
    free = Output(convert(name, model, use_backprop=False))
    inputs = [t.to(dtype).requires_grad_() if t.is_floating_point() else t for t in example(name)]
    errors = assert_gradients_match(backprop, free, *inputs, seed=3, steps=2)
    assert len([k for k in errors if k.startswith("grad.")]) == sum(
        1 for p in free.parameters() if p.requires_grad
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_the_default_plan_and_a_checkpointed_stack(name: str) -> None:
    """With no option but gamma, a stack of three float64 layers comes out memory-free (exact: 25
    bytes per element, int64 words, against 32 checkpointed); forced to checkpoint, the layers
    run under torch.utils.checkpoint with their masks and keyword arguments, dropout replayed,
    and match plain backprop's gradients."""
    _, path, _ = FAMILIES[name]
    model = FAMILIES[name][0]().double().train()
    default = transform_to_momentumnet(model, path, keep_first_layer=False, gamma=0.9)
    plan = default.inertia_plan[path]
    assert (plan.method, plan.memory_free_bytes, plan.checkpoint_bytes) == ("memory_free", 25, 32)
    assert default.get_submodule(path).method == "memory_free"
    backprop = Output(convert(name, model, use_backprop=True))
    checkpointed = Output(convert(name, model, method="checkpoint"))
    inputs = [t.double().requires_grad_() if t.is_floating_point() else t for t in example(name)]
    assert_gradients_match(backprop, checkpointed, *inputs, seed=3, steps=2)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_decoder_cache_and_generate(name: str) -> None:
    model = FAMILIES[name][0]()
    converted = convert(name, model)
    ids, mask = example(name)
    # Training with HF's default use_cache=True runs without the cache, after a warning, as
    # HF's gradient checkpointing does; the gradients are those of use_cache=False.
    grads = []
    for use_cache in (True, False):
        converted.zero_grad()
        torch.manual_seed(0)  # the same dropout
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = converted(input_ids=ids, attention_mask=mask, use_cache=use_cache)
        assert any("use_cache=False" in str(w.message) for w in caught) == use_cache
        out.logits.sum().backward()
        grads.append([p.grad.clone() for p in converted.parameters() if p.grad is not None])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    # Generation runs no backward: the cache is updated once per layer, as in the original.
    original = transform_to_momentumnet(
        copy.deepcopy(model),
        FAMILIES[name][1],
        gamma=0.0,
        keep_first_layer=False,
        use_backprop=True,
    )
    for m in (model, original):
        m.eval()
    prompt = ids[:1, :5]
    tokens = original.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(tokens, model.generate(prompt, max_new_tokens=6, do_sample=False))
    converted.eval()
    assert converted.generate(prompt, max_new_tokens=6, do_sample=False).shape == (1, 11)
