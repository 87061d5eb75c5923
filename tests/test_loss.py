"""The chunked causal-LM loss: HuggingFace's loss and gradients without the whole logits."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import inertia.loss
from inertia import InertiaError, transform_to_momentumnet
from inertia.loss import causal_lm_loss, use_chunked_loss
from inertia.testing import LiveTensorMeter

transformers = pytest.importorskip("transformers")


def whole_loss(
    hidden: torch.Tensor,
    head: nn.Linear,
    labels: torch.Tensor,
    num_items_in_batch: int | None = None,
) -> torch.Tensor:
    """HuggingFace's ``ForCausalLMLoss`` on the whole logits, in their dtype (HuggingFace's
    upcasts to float32 only: the same for float32 models)."""
    logits = head(hidden)[:, :-1].reshape(-1, head.out_features)
    targets = labels[:, 1:].reshape(-1)
    if num_items_in_batch is None:
        return nn.functional.cross_entropy(logits, targets)
    return nn.functional.cross_entropy(logits, targets, reduction="sum") / num_items_in_batch


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("items", [None, 37])
def test_loss_and_gradients_are_the_whole_logits(chunk: int, items: int | None) -> None:
    """float64: the loss and the gradients of the hidden states, the weight and the bias equal
    those of the whole logits' loss to rounding, ignored labels and num_items_in_batch included;
    the chunk may cut rows anywhere."""
    torch.manual_seed(0)
    head = nn.Linear(16, 97).double()
    hidden = torch.randn(3, 20, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 97, (3, 20))
    labels[0, :5] = -100
    losses, grads = [], []
    for chunked in (False, True):
        head.zero_grad()
        hidden.grad = None
        if chunked:
            loss = causal_lm_loss(hidden, head, labels, num_items_in_batch=items, chunk_size=chunk)
        else:
            loss = whole_loss(hidden, head, labels, num_items_in_batch=items)
        (loss * 3).backward()
        losses.append(loss.detach())
        grads.append([hidden.grad, head.weight.grad, head.bias.grad])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-13, atol=0)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15)


def test_float32_matches_huggingfaces_loss() -> None:
    """float32: HuggingFace's own ``ForCausalLMLoss``, to float32 rounding."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(1)
    head = nn.Linear(32, 500, bias=False)
    hidden = torch.randn(2, 64, 32, requires_grad=True)
    labels = torch.randint(0, 500, (2, 64))
    chunked = causal_lm_loss(hidden, head, labels, chunk_size=16)
    (grad_chunked,) = torch.autograd.grad(chunked, hidden)
    whole = ForCausalLMLoss(head(hidden), labels, 500)
    (grad_whole,) = torch.autograd.grad(whole, hidden)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_chunked, grad_whole, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("default", [False, True], ids=["chunk_size", "default"])
def test_the_logits_are_never_whole(default: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward and backward hold one chunk's logits at a time: the step's live tensors stay far
    below the logits' size, which the whole loss allocates several times. By default the chunk
    holds `CHUNK_BYTES` of logits (made 1 MiB here: 64 tokens)."""
    torch.manual_seed(2)
    tokens, vocab, chunk = 1024, 4096, 64
    monkeypatch.setattr(inertia.loss, "CHUNK_BYTES", chunk * vocab * 4)
    monkeypatch.setattr(inertia.loss, "MIN_CHUNK_TOKENS", 1)
    assert inertia.loss.chunk_tokens(vocab) == chunk
    head = nn.Linear(32, vocab, bias=False)
    hidden = torch.randn(1, tokens, 32, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens))
    logits_bytes = tokens * vocab * 4
    peaks = []
    size = None if default else chunk
    for loss_fn in (whole_loss, lambda h, m, y: causal_lm_loss(h, m, y, chunk_size=size)):
        with LiveTensorMeter() as meter:
            loss_fn(hidden, head, labels).backward()
        peaks.append(meter.peak)
    assert peaks[0] > 2 * logits_bytes  # the baseline really holds the logits (and more)
    assert peaks[1] < logits_bytes / 4
    assert peaks[1] < 4 * chunk * vocab * 4 + 4 * head.weight.numel() * 4


def test_bad_arguments() -> None:
    head = nn.Linear(4, 10)
    with pytest.raises(ValueError, match="chunk_size=0; it counts tokens"):
        causal_lm_loss(
            torch.randn(1, 3, 4), head, torch.zeros(1, 3, dtype=torch.long), chunk_size=0
        )
    with pytest.raises(ValueError, match="chunk_size=True; it counts tokens"):
        use_chunked_loss(llama(1), chunk_size=True)  # type: ignore[arg-type]
    assert inertia.loss.chunk_tokens(10**9) == inertia.loss.MIN_CHUNK_TOKENS
    with pytest.raises(ValueError, match="4 targets for 3 hidden states"):
        causal_lm_loss(torch.randn(1, 3, 4), head, shift_labels=torch.zeros(1, 4, dtype=torch.long))


def llama(layers: int = 3) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    model.config.use_cache = False
    return model


def test_a_converted_llama_trains_with_the_chunked_loss() -> None:
    """A converted Llama (memory-free exact stack) with `use_chunked_loss`: its loss and its
    gradients are those of its whole logits' loss to float64 rounding (HuggingFace's own loss
    computes the softmax in float32, so it is 1e-6 away), and it returns no logits; without
    labels it runs as before."""
    base = transform_to_momentumnet(llama().double(), "model.layers", keep_first_layer=False)
    chunked = use_chunked_loss(copy.deepcopy(base), chunk_size=5)
    ids = torch.randint(1, 300, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    own = base(input_ids=ids, attention_mask=mask, labels=labels).loss
    whole = nn.functional.cross_entropy(
        base(input_ids=ids, attention_mask=mask).logits[:, :-1].reshape(-1, 300),
        labels[:, 1:].reshape(-1),
    )
    whole.backward()
    out = chunked(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert out.logits is None
    torch.testing.assert_close(out.loss, whole, rtol=1e-13, atol=0)
    torch.testing.assert_close(out.loss, own.double(), rtol=1e-6, atol=0)
    grads = [{n: p.grad for n, p in m.named_parameters()} for m in (base, chunked)]
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-9, atol=1e-13)
    with torch.no_grad():
        torch.testing.assert_close(chunked(input_ids=ids).logits, base(input_ids=ids).logits)


# peft 0.21 calls an alias that transformers 5 deprecates.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_trainer_and_lora_use_it(tmp_path: Path) -> None:
    """HuggingFace's Trainer (gradient accumulation, which passes num_items_in_batch) on a
    LoRA-wrapped model with the chunked loss follows the same model with its own loss."""
    pytest.importorskip("accelerate")
    peft = pytest.importorskip("peft")
    g = torch.Generator().manual_seed(1)
    rows = [
        {"input_ids": ids, "labels": ids.clone()}
        for ids in torch.randint(1, 300, (16, 12), generator=g)
    ]
    losses = []
    for chunk in (None, 4):
        model = transform_to_momentumnet(llama(), "model.layers", keep_first_layer=False)
        if chunk is not None:
            use_chunked_loss(model, chunk_size=chunk)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        lora = peft.get_peft_model(model, config)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(chunk)), max_steps=3, per_device_train_batch_size=4,
            gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1,
            save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
        )  # fmt: skip
        trainer = transformers.Trainer(model=lora, args=args, train_dataset=rows)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            trainer.train()
        losses.append([row["loss"] for row in trainer.state.log_history if "loss" in row])
    assert len(losses[0]) == 3
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_a_model_that_transforms_its_logits_is_refused() -> None:
    model = llama(1)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(InertiaError, match="final_logit_softcapping"):
        use_chunked_loss(model)
