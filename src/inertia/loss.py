"""A causal language model's loss without its logits: computed chunk by chunk of tokens.

At long context the logits, not the residual stack, set a fine-tuning step's peak: SmolLM2's
49,152-token vocabulary takes 192 KiB per token in float32, several times what its layers keep per
token checkpointed. `causal_lm_loss` computes the loss of HuggingFace's causal LMs (the labels
shifted by one token, ``-100`` ignored, the mean over the tokens counted, or the sum divided by
``num_items_in_batch``) from the last hidden states and the output layer, ``chunk_size`` tokens at a
time: its forward keeps one chunk's logits at once and, per token, their log-sum-exp; its backward
computes each chunk's logits again and their gradient, and pulls it back to the hidden states and
the output layer's weight. The gradients are those of the whole logits' loss, to rounding.
`use_chunked_loss` makes a HuggingFace causal LM compute its loss this way whenever it is given
labels, so that ``Trainer`` and plain training loops use it unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any

import torch
from torch import Tensor, nn

from ._errors import InertiaError

__all__ = ["causal_lm_loss", "chunk_tokens", "use_chunked_loss"]


class _ChunkedCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets`` (rows whose
    target is ``ignore_index`` count nothing), divided by ``denominator``, one chunk of rows at a
    time; the logits are computed again in the backward."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        ignore_index: int,
        chunk: int,
        denominator: Tensor,
    ) -> Tensor:
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)
        acc = _accumulation(hidden.dtype)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        lse = torch.empty(targets.shape, dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = nn.functional.linear(hidden[rows], weight, bias).to(acc)
            lse[rows] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe[rows, None]).squeeze(1)
            total += ((lse[rows] - picked) * valid[rows]).sum()
        ctx.save_for_backward(hidden, weight, bias, safe, valid, lse, denominator)
        ctx.chunk = chunk
        return total / denominator.to(acc)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, safe, valid, lse, denominator = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        acc = lse.dtype
        scale = (grad / denominator).to(acc)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=acc) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            h = hidden[rows]
            logits = nn.functional.linear(h, weight, bias).to(acc)
            # d(lse - picked)/dlogits = softmax - one-hot, for the rows that count.
            g = torch.exp_(logits.sub_(lse[rows, None]))
            g[torch.arange(g.shape[0], device=g.device), safe[rows]] -= 1
            g.mul_((valid[rows] * scale)[:, None])
            g = g.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = g @ weight
            if grad_weight is not None:
                grad_weight.addmm_(g.t().to(acc), h.to(acc))
            if grad_bias is not None:
                grad_bias += g.to(acc).sum(0)
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
            None,
            None,
        )


#: Bytes of one chunk's logits that `chunk_tokens` aims at.
CHUNK_BYTES = 32 * 2**20
#: The fewest tokens `chunk_tokens` gives, so that the output layer's product keeps enough rows.
MIN_CHUNK_TOKENS = 64


def chunk_tokens(vocab: int, dtype: torch.dtype = torch.float32) -> int:
    """The default ``chunk_size`` of `causal_lm_loss` and `use_chunked_loss`: the tokens whose
    logits, in the dtype the loss computes them (float32 at least), take `CHUNK_BYTES` (32 MiB),
    and at least `MIN_CHUNK_TOKENS`.

    At long context one chunk's logits are a large part of a step's peak: on SmolLM2-135M with
    LoRA at 4,096 tokens, 1,024-token chunks take 192 MiB of a 451.1 MiB peak
    (``benchmarks/results/llm.md``). Smaller chunks cost time instead: the output layer's weight
    is read once per chunk in the forward and twice in the backward.

    Examples:
        >>> chunk_tokens(49_152)  # SmolLM2's vocabulary
        170
        >>> chunk_tokens(128_256), chunk_tokens(49_152, torch.float64)  # Llama 3's; float64
        (65, 85)
    """
    itemsize = torch.empty((), dtype=_accumulation(dtype)).element_size()
    return max(MIN_CHUNK_TOKENS, CHUNK_BYTES // (vocab * itemsize))


def _check_chunk_size(chunk_size: object) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}; it counts tokens, 1 or more (or None).")


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the logits' softmax: float32 at least (HuggingFace upcasts 16-bit logits),
    float64 for float64 models."""
    return torch.promote_types(dtype, torch.float32)


def causal_lm_loss(
    hidden_states: Tensor,
    output_layer: nn.Linear,
    labels: Tensor | None = None,
    *,
    shift_labels: Tensor | None = None,
    num_items_in_batch: Tensor | int | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> Tensor:
    """HuggingFace's causal LM loss (``ForCausalLMLoss``) of ``output_layer(hidden_states)``, with
    no more than ``chunk_size`` tokens' logits alive at once, forward and backward.

    Args:
        hidden_states: The last hidden states, ``(batch, tokens, hidden)``.
        output_layer: The model's output embeddings (``model.get_output_embeddings()``).
        labels: Token ids ``(batch, tokens)``; position ``t`` predicts ``labels[:, t + 1]``.
        shift_labels: The targets already shifted (``labels`` is then ignored).
        num_items_in_batch: Divide the summed loss by this (``Trainer`` passes the tokens counted
            over the accumulated micro-batches); None: the mean over the tokens counted.
        ignore_index: Targets that count nothing.
        chunk_size: Tokens whose logits are computed at once; None: `chunk_tokens` of the
            output layer's vocabulary (32 MiB of logits).

    Returns:
        The loss, a scalar in float32 (float64 for float64 hidden states: HuggingFace's loss
        computes in float32 there).

    Examples:
        >>> head = nn.Linear(8, 50, bias=False)
        >>> hidden, labels = torch.randn(2, 5, 8), torch.randint(0, 50, (2, 5))
        >>> logits = head(hidden)[:, :-1].reshape(-1, 50)
        >>> whole = nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1))
        >>> bool(torch.allclose(causal_lm_loss(hidden, head, labels, chunk_size=3), whole))
        True
    """
    if chunk_size is None:
        chunk_size = chunk_tokens(output_layer.out_features, hidden_states.dtype)
    _check_chunk_size(chunk_size)
    if shift_labels is None:
        if labels is None:
            raise TypeError("causal_lm_loss needs labels or shift_labels.")
        padded = nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = padded[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden_states.device)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"{targets.shape[0]} targets for {hidden.shape[0]} hidden states; labels must have "
            "the hidden states' (batch, tokens) shape."
        )
    if num_items_in_batch is None:
        denominator = (targets != ignore_index).sum().float()
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=hidden.device).float()
    loss: Tensor = _ChunkedCrossEntropy.apply(
        hidden,
        output_layer.weight,
        output_layer.bias,
        targets,
        ignore_index,
        chunk_size,
        denominator,
    )
    return loss


# Settings of a causal LM's output that the plain product of the output layer does not compute.
_UNSUPPORTED = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def use_chunked_loss(model: nn.Module, chunk_size: int | None = None) -> nn.Module:
    """Make a HuggingFace causal LM compute its loss with `causal_lm_loss` whenever it is called
    with ``labels`` (or ``shift_labels``): its forward then returns the loss and no logits
    (``logits`` is None), and never materializes them. Called without labels (evaluation,
    ``generate``), it runs as before. ``Trainer``, peft and ``save_pretrained`` see the same
    model; its gradients are those of the model's own loss, to rounding.

    Args:
        model: A causal LM with a base model (``model.base_model_prefix``) and a linear output
            layer (``get_output_embeddings()``), such as ``LlamaForCausalLM`` or
            ``GPT2LMHeadModel``.
        chunk_size: Tokens whose logits are computed at once; None: `chunk_tokens` of the
            model's vocabulary (32 MiB of logits).

    Returns:
        ``model`` itself.

    Raises:
        InertiaError: The model scales or caps its logits, which the loss would leave out.
    """
    config = getattr(model, "config", None)
    scaled = [name for name in _UNSUPPORTED if getattr(config, name, None) not in (None, 1, 1.0)]
    if scaled:
        raise InertiaError(
            f"{type(model).__name__} transforms its logits ({', '.join(scaled)}), which "
            "use_chunked_loss does not compute; use the model's own loss."
        )
    hf: Any = model  # HuggingFace's attributes, which nn.Module's typing does not know
    head = hf.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise InertiaError(
            f"{type(model).__name__}'s output layer is a {type(head).__name__}, not nn.Linear: "
            "use_chunked_loss computes the logits as hidden @ weight.T + bias."
        )
    prefix = getattr(model, "base_model_prefix", "")
    if not isinstance(getattr(model, prefix, None), nn.Module):
        raise InertiaError(
            f"{type(model).__name__} has no base model (base_model_prefix={prefix!r}); "
            "use_chunked_loss calls it for the hidden states."
        )
    if chunk_size is not None:
        _check_chunk_size(chunk_size)
    hf._inertia_chunk_size = chunk_size

    # The model's own signature, which Trainer reads to keep the dataset's columns it accepts.
    @functools.wraps(type(model).forward)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _chunked_forward(self, *args, **kwargs)

    hf.forward = types.MethodType(forward, model)
    return model


def _chunked_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    """The causal LM's forward with `causal_lm_loss` in place of its logits and loss."""
    labels = kwargs.pop("labels", None)
    shift_labels = kwargs.pop("shift_labels", None)
    if labels is None and shift_labels is None:
        return type(self).forward(self, *args, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast  # the model is one of HF's

    num_items = kwargs.pop("num_items_in_batch", None)
    kwargs.pop("logits_to_keep", None)
    kwargs.pop("return_dict", None)
    outputs = getattr(self, self.base_model_prefix)(*args, **kwargs)
    loss = causal_lm_loss(
        outputs.last_hidden_state,
        self.get_output_embeddings(),
        labels,
        shift_labels=shift_labels,
        num_items_in_batch=num_items,
        chunk_size=self._inertia_chunk_size,
    )
    fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} - {"loss", "logits"}
    extra = {name: outputs[name] for name in fields if name in outputs}
    return CausalLMOutputWithPast(loss=loss, logits=None, **extra)
