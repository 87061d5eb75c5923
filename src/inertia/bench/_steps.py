"""What every benchmark runs: the variants of a residual stack and one training step of each.

The lowest module of `inertia.bench`: the depth sweep, the converted models and the true-peak
table all build their variants and count bytes saved for backward and step times here.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import math
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from .._core import ExactArithmetic, kernels
from ..loss import chunk_tokens
from ..nn import MomentumNet
from ..testing import SavedTensorMeter

VARIANTS = ("plain", "checkpoint", "momentum_backprop", "momentum_free", "momentum_exact")
#: The conversion as a user writes it, with no option but gamma: each stack's plan (`inertia.plan`);
#: on a stack alone, `MomentumNet` with ``use_backprop=False``.
DEFAULT = "default"
#: Timed only: checkpointing every block with the whole block recomputed (early stop off): the
#: recomputation that a memory-free stack cannot skip, since its inverse reads the block's output,
#: where checkpointing's early stop ends the recomputation at the block's last saved tensor.
RECOMPUTE = "checkpoint_whole"
#: Timed only: `RECOMPUTE` plus exact mode's integer update and its inverse (`IntegerFloor`).
FLOOR = "floor"
#: The paper's package, measured as a baseline when it is installed (``pip install momentumnet``).
PAPER = "momentumnet_0.10"
#: ResNets only: memory-free (float or exact) with the stem and each stage's first block
#: checkpointed too (``checkpoint_stem=True, checkpoint_kept=True``).
LEAN_RESNET = ("momentum_free_ckpt_stem_first", "momentum_exact_ckpt_stem_first")
#: Causal LMs trained on their loss (``PeakCase.labels``) only: HuggingFace's checkpointing, the
#: default conversion and the float memory-free one (``exact=False``), each with
#: `inertia.use_chunked_loss` (the logits never whole), and `FLOOR` with it (timed only).
CHUNKED = ("checkpoint_chunked", "default_chunked", "float_chunked", "floor_chunked")
#: `PeakCase.precision`: float32, bfloat16 weights, float32 weights under bfloat16 autocast.
PRECISIONS = ("float32", "bfloat16", "autocast")
_RESNET_STAGES = ["layer1", "layer2", "layer3", "layer4"]


def default_variants() -> tuple[str, ...]:
    """`VARIANTS`, and the paper's package (`PAPER`) when it is importable."""
    return VARIANTS + ((PAPER,) if importlib.util.find_spec("momentumnet") else ())


class Residual(nn.Module):
    """The plain residual stack ``x = x + f(x)``."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        for f in self.blocks:
            x = x + f(x)
        return x


def mlp_blocks(width: int, depth: int) -> list[nn.Module]:
    """``depth`` blocks Linear(width)-GELU-Linear(width)."""
    w = width
    return [nn.Sequential(nn.Linear(w, w), nn.GELU(), nn.Linear(w, w)) for _ in range(depth)]


def variant_model(
    variant: str, blocks: list[nn.Module], gamma: float, for_memory: bool
) -> nn.Module:
    """The residual stack of ``blocks`` as ``variant`` runs it (the blocks are shared, not copied).

    ``for_memory``: the model whose saved bytes are counted (reentrant checkpointing, which keeps
    its inputs where saved-tensor hooks see them), else the one that is timed.
    """
    if variant == "plain":
        return Residual(blocks)
    if variant in ("checkpoint", RECOMPUTE, FLOOR):
        floor = gamma if variant == FLOOR else None
        whole = variant != "checkpoint"
        return checkpoint_every_block(Residual(blocks), ["blocks"], for_memory, floor, whole=whole)
    if variant == "momentum_backprop":
        return MomentumNet(blocks, gamma, use_backprop=True)
    if variant == "momentum_free":
        return MomentumNet(blocks, gamma, use_backprop=False, exact=False)
    if variant == "momentum_exact":
        return MomentumNet(blocks, gamma, use_backprop=False, exact=True)
    if variant == DEFAULT:
        return MomentumNet(blocks, gamma, use_backprop=False)
    if variant == PAPER:
        import momentumnet

        net: nn.Module = momentumnet.MomentumNet(blocks, gamma, use_backprop=False)
        return net
    known = ", ".join((*VARIANTS, DEFAULT, RECOMPUTE, FLOOR, PAPER))
    raise ValueError(f"unknown variant {variant!r}; choose from {known}")


class Checkpointed(nn.Module):
    """A block run under ``torch.utils.checkpoint`` (non-tensor and mask arguments captured).

    ``whole``: the backward recomputes the whole block (non-reentrant checkpointing's early stop
    off), as a memory-free stack must: its inverse reads the block's output. With early stop (the
    default, which users get), the recomputation ends once the last tensor that the backward
    needs is saved, which skips the block's last operations when their output is not saved (the
    second Linear of an MLP block, a Llama layer's down projection).
    """

    def __init__(self, block: nn.Module, reentrant: bool, whole: bool = False) -> None:
        super().__init__()
        self.block, self.reentrant, self.whole = block, reentrant, whole

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # parents inspect their layers (nn.TransformerEncoder's fast path)
            return getattr(self._modules["block"], name)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        # Read as the forward runs, and kept for the backward's recomputation.
        whole = set_checkpoint_early_stop(False) if self.whole else contextlib.nullcontext()
        with whole:
            return checkpoint(
                functools.partial(self.block, *(), **kwargs), x, *args, use_reentrant=self.reentrant
            )


class IntegerFloor(Checkpointed):
    """A block under non-reentrant checkpoint, recomputed whole, that also runs exact mode's
    integer kernels at its output's size: the update in the forward and its inverse in the
    backward, in place on integers that the stack's blocks share, as a memory-free exact stack
    does.

    Its step time is the floor of the memory-free exact stack's: what no implementation of it
    can skip (one more whole forward per block, the integer update and its inverse) without the
    rest (records of what the forward used, generator replay, the inversion check, autograd nodes
    of its own). It is timed only: it keeps each block's output for the inverse.
    """

    def __init__(
        self, block: nn.Module, gamma: float, integers: dict[int, list[Tensor]], where: str
    ) -> None:
        super().__init__(block, reentrant=False, whole=True)
        self.arith = ExactArithmetic(gamma, fraction_bits=24, depth=1)  # its kernels' constants
        self.integers = integers  # x, v and the buffer by element count, shared by the stack
        self.where = where  # "first", "last", "only" or "" (in between) in the stack

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        out = super().forward(x, *args, **kwargs)
        first = out[0] if isinstance(out, tuple) else out
        f = first.detach().reshape(1, -1)
        if f.numel() not in self.integers:
            # As a short memory-free stack holds them: int32 x and v, a one-byte buffer.
            dtypes = (torch.int32, torch.int32, torch.uint8)
            self.integers[f.numel()] = [f.new_zeros(f.shape, dtype=d) for d in dtypes]
        ints = self.integers[f.numel()]
        grid = self.arith._set_grid(torch.full((1,), 24, device=f.device), f.shape)
        p, q = self.arith._on(f.device)
        kernels.step_narrow(*ints, f, p, q, grid.c, grid.inv, f.dtype)  # int32 words: q <= 2**19

        def inverse(grad: Tensor) -> None:
            if self.where in ("last", "only"):  # x_n from x_{n+1}; below, the kernel reads ahead
                kernels.unstep_position(ints[0], ints[1], grid.inv, f.dtype)
            kernels.unstep_velocity_narrow(*ints, f, p, q, grid.c)
            if self.where in ("first", "only"):
                ints[0].add_(ints[1])  # x_0 again: the kernel moved it one step ahead
            else:
                kernels.convert(ints[0], grid.inv, f.dtype)  # the float of x_{n-1}

        if first.requires_grad:
            first.register_hook(inverse)
        return out


def checkpoint_every_block(
    model: nn.Module,
    paths: Sequence[str],
    reentrant: bool = False,
    floor: float | None = None,
    keep_first: bool = False,
    whole: bool = False,
) -> nn.Module:
    """A copy of ``model`` whose stacks at ``paths`` run each block under checkpoint: the
    baseline that the memory-free stacks are compared with. ``floor``: a gamma, for blocks that
    also run exact mode's integer update (`IntegerFloor`, recomputed whole), but the first of
    each stack where ``keep_first`` (as `transform_to_momentumnet` keeps it an ordinary layer).
    ``whole``: the other blocks recompute whole too (`Checkpointed`)."""
    model = copy.deepcopy(model)
    for path in paths:
        stack = stack_at(model, path)
        integers: dict[int, list[Tensor]] = {}
        first, last = int(keep_first), len(stack) - 1
        ends = {first: "first", last: "last"} if last > first else {first: "only"}
        for i, block in enumerate(list(stack)):
            stack[i] = (
                Checkpointed(block, reentrant, whole)
                if floor is None or i < first
                else IntegerFloor(block, floor, integers, ends.get(i, ""))
            )
    return model


def stack_at(model: nn.Module, path: str) -> nn.Sequential | nn.ModuleList:
    """The stack of blocks at the dotted ``path`` of ``model``."""
    stack = model.get_submodule(path)
    assert isinstance(stack, (nn.Sequential, nn.ModuleList))
    return stack


@dataclass(frozen=True)
class PeakCase:
    """A model and its inputs, built identically (same seed) in every process that measures it.

    Args:
        model: ``"mlp"``: residual blocks Linear(width)-GELU-Linear(width), inputs of shape
            ``(batch, width)``. ``"smollm2"``: the pretrained SmolLM2-135M-Instruct
            (`inertia.models.smollm2`, 30 Llama layers, cache off), token ids of shape ``(batch,
            seq_len)``; its ``checkpoint`` variant is HuggingFace's
            ``activation_checkpointing_enable()``. ``"llama-tiny"``: the same architecture with
            random weights, ``depth`` layers of width ``width`` (for smoke runs). ``"encoder"``:
            ``nn.TransformerEncoder`` of ``depth`` pre-norm layers (``norm_first=True``,
            ``batch_first=True``, d_model ``width``, ``heads`` heads, feed-forward ``4 * width``,
            no dropout) and a final LayerNorm, inputs of shape
            ``(batch, seq_len, width)``. A torchvision ResNet's name (``"resnet50"``): inputs of
            shape ``(batch, 3, image_size, image_size)``, 1,000 classes, train mode.
        depth: Blocks of the mlp, layers of the encoder; a ResNet's is fixed by its name.
        batch: Batch size.
        width: The mlp's width, the encoder's d_model.
        seq_len: The encoder's sequence length.
        heads: The encoder's attention heads.
        image_size: The ResNet's input height and width.
        gamma: The momentum of the converted stacks.
        seed: Seeds the weights and inputs.
        lora: Train peft LoRA adapters (rank 8 on the attention projections) instead of every
            weight; ``"smollm2"`` and ``"llama-tiny"`` only.
        labels: Call the causal LM with its token ids as labels and train on its own loss (the
            next token's cross-entropy), as fine-tuning does, instead of the logits' mean square;
            ``"smollm2"`` and ``"llama-tiny"`` only. The `CHUNKED` variants need it.
        precision: `PRECISIONS`: ``"float32"``; ``"bfloat16"``: the weights cast to bfloat16
            before the variant is built (as ``from_pretrained(..., dtype=torch.bfloat16)`` loads
            them); ``"autocast"``: float32 weights, the forward under bfloat16 autocast.
        chunk_tokens: The ``chunk_size`` of `inertia.use_chunked_loss` in the `CHUNKED`
            variants; None: its default (`inertia.loss.chunk_tokens`).

    Examples:
        >>> PeakCase("encoder", depth=12, batch=16, width=256, seq_len=512).label()
        'encoder, 12 layers, d 256, batch 16, seq 512'
    """

    model: str = "mlp"
    depth: int = 8
    batch: int = 32
    width: int = 64
    seq_len: int = 128
    heads: int = 8
    image_size: int = 224
    gamma: float = 0.9
    seed: int = 0
    lora: bool = False
    labels: bool = False
    precision: str = "float32"
    chunk_tokens: int | None = None

    def stack_of(self, model: nn.Module) -> nn.Module | None:
        """The model's one stack of blocks, whose saved bytes are counted apart
        (`stack_saved_bytes`): the transformers' layers (wherever peft's wrapper put them); None
        for the mlp (the model is its stack) and the ResNets (four stages)."""
        from ..models.smollm2 import LAYERS

        if self.model not in ("smollm2", "llama-tiny", "encoder"):
            return None
        path = "layers" if self.model == "encoder" else LAYERS
        found = [
            m for name, m in model.named_modules() if name == path or name.endswith("." + path)
        ]
        if found:
            stack: nn.Module = found[0]
            return stack
        raise ValueError(f"{type(model).__name__} has no stack at {path!r}")

    def runs(self, variant: str) -> bool:
        """Whether ``variant`` applies to this case (`LEAN_RESNET` only to the ResNets, `CHUNKED`
        only to causal LMs trained on their loss)."""
        if variant in CHUNKED:
            return self.labels
        return variant not in LEAN_RESNET or self.model.startswith("resnet")

    def logits_bytes(self, variant: str, vocab: int) -> int:
        """Bytes of the float32 logits that the loss of ``variant`` computes at once: every
        token's, or one chunk's (`CHUNKED`); 0 for models without logits."""
        if self.model not in ("smollm2", "llama-tiny"):
            return 0
        tokens = self.batch * self.seq_len
        if variant in CHUNKED:
            tokens = min(tokens, self.chunk_tokens or chunk_tokens(vocab))
        return 4 * vocab * tokens

    def label(self) -> str:
        """The case in a few words, for tables."""
        if self.precision != "float32":
            return f"{replace(self, precision='float32').label()}, {self.precision}"
        if self.model in ("smollm2", "llama-tiny"):
            return f"{self.model}, seq {self.seq_len}, batch {self.batch}" + (
                ", LoRA" if self.lora else ", full"
            )
        if self.model == "mlp":
            return f"mlp {self.width}, depth {self.depth}, batch {self.batch}"
        if self.model == "encoder":
            return (
                f"encoder, {self.depth} layers, d {self.width}, batch {self.batch}, "
                f"seq {self.seq_len}"
            )
        return f"{self.model}, batch {self.batch}, {self.image_size}x{self.image_size}"


def build(
    case: PeakCase, variant: str, device: torch.device, for_memory: bool = False
) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """(model in train mode, inputs) of ``case`` run as ``variant`` (see `inertia.bench`).

    ``for_memory``: the twin whose bytes saved for backward can be counted (reentrant
    checkpointing); else the model as it is measured and timed.
    """
    from ..transform import transform_to_momentumnet  # it imports nn, as this module does

    if not case.runs(variant):
        only = "causal LMs with labels" if variant in CHUNKED else "ResNets"
        raise ValueError(f"variant {variant!r} is not measured on {case.model}: {only} only")
    if case.precision not in PRECISIONS:
        raise ValueError(f"precision {case.precision!r}: one of {', '.join(PRECISIONS)}")
    if case.labels and case.model not in ("smollm2", "llama-tiny"):
        raise ValueError(f"labels=True needs a causal LM (smollm2 or llama-tiny), not {case.model}")
    torch.manual_seed(case.seed)
    if case.model == "mlp":
        blocks = mlp_blocks(case.width, case.depth)
        model = variant_model(variant, blocks, case.gamma, for_memory)
        return _in_precision(case, model, torch.randn(case.batch, case.width), device)
    paths: str | list[str]
    if case.model == "encoder":
        w = case.width
        layer = nn.TransformerEncoderLayer(
            w, case.heads, 4 * w, dropout=0.0, batch_first=True, norm_first=True
        )
        base: nn.Module = nn.TransformerEncoder(
            layer, case.depth, norm=nn.LayerNorm(w), enable_nested_tensor=False
        )
        x = torch.randn(case.batch, case.seq_len, w)
        paths, keep_first = "layers", False
    elif case.model.startswith("resnet"):
        from torchvision import models

        base = getattr(models, case.model)()
        x = torch.randn(case.batch, 3, case.image_size, case.image_size)
        paths, keep_first = _RESNET_STAGES, True
    elif case.model in ("smollm2", "llama-tiny"):
        from ..models.smollm2 import LAYERS, load_smollm2, tiny_llama

        llm: Any = (
            load_smollm2()[0] if case.model == "smollm2" else tiny_llama(case.depth, case.width)
        )
        llm.config.use_cache = False
        vocab = llm.config.vocab_size
        ids = torch.Generator().manual_seed(case.seed)
        x = torch.randint(0, vocab, (case.batch, case.seq_len), generator=ids)
        base, paths, keep_first = llm, LAYERS, False
    else:
        raise ValueError(
            f"unknown case model {case.model!r}: mlp, encoder, resnet<N>, smollm2 or llama-tiny"
        )
    if case.precision == "bfloat16":
        base.to(torch.bfloat16)  # before the conversion, which plans by the stack's dtype
    if variant == "plain":
        model = base
    elif variant in ("checkpoint", CHUNKED[0]) and case.model in ("smollm2", "llama-tiny"):
        # HuggingFace's own, as its users turn it on (non-reentrant; reentrant to count bytes).
        llm.activation_checkpointing_enable({"use_reentrant": for_memory})
        model = base
    elif variant in ("checkpoint", RECOMPUTE, FLOOR, CHUNKED[3]):
        stacks = [paths] if isinstance(paths, str) else paths
        floor = case.gamma if variant in (FLOOR, CHUNKED[3]) else None
        whole = variant != "checkpoint"
        model = checkpoint_every_block(base, stacks, for_memory, floor, keep_first, whole)
    elif variant in (DEFAULT, CHUNKED[1]):
        model = transform_to_momentumnet(
            base, paths, keep_first_layer=keep_first, gamma=case.gamma, inplace=True
        )
    elif variant in (
        "momentum_backprop",
        "momentum_free",
        "momentum_exact",
        *LEAN_RESNET,
        CHUNKED[2],
    ):
        lean = variant in LEAN_RESNET
        model = transform_to_momentumnet(
            base,
            paths,
            keep_first_layer=keep_first,
            gamma=case.gamma,
            use_backprop=variant == "momentum_backprop",
            exact=variant.startswith("momentum_exact"),
            method="memory_free",
            checkpoint_kept=lean,
            checkpoint_stem=lean,
            inplace=True,
        )
    else:
        raise ValueError(f"variant {variant!r} is not measured on {case.model}")
    if variant in CHUNKED:
        from ..loss import use_chunked_loss

        use_chunked_loss(model, case.chunk_tokens)
    if case.lora:
        model = add_lora(model)
    if case.labels:
        model = CausalLMLoss(model)
    return _in_precision(case, model, x, device)


def _in_precision(
    case: PeakCase, model: nn.Module, x: Tensor, device: torch.device
) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """The model in train mode on ``device`` and its input, in ``case.precision``."""
    if case.precision == "bfloat16":
        model.to(torch.bfloat16)
        x = x.to(torch.bfloat16) if x.is_floating_point() else x
    elif case.precision == "autocast":
        model = Autocast(model)
    return model.to(device).train(), (x.to(device),)


class Autocast(nn.Module):
    """``model`` run under bfloat16 autocast on its device (`PeakCase.precision`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any) -> Any:
        device = next(self.model.parameters()).device.type
        with torch.autocast(device, torch.bfloat16):
            return self.model(*args)


#: The attention projections that `add_lora` adapts (a Llama's names).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def add_lora(model: nn.Module) -> nn.Module:
    """``model`` with peft LoRA adapters of rank 8 (alpha 16, no dropout) on its attention
    projections (`LORA_TARGETS`), every other weight frozen: how the benchmarks and the LLM
    experiment train LoRA (`PeakCase.lora`). The adapters' ``A`` draws from torch's generator;
    ``B`` starts at zero, so the model computes what it computed before.

    Examples:
        >>> from inertia.models.smollm2 import tiny_llama
        >>> model = add_lora(tiny_llama(2, 64))  # q and o 64 -> 64, k and v 64 -> 32
        >>> sum(p.numel() for p in model.parameters() if p.requires_grad)
        7168
    """
    import peft

    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(LORA_TARGETS))
    with warnings.catch_warnings():
        # peft 0.21 reads an alias that transformers 5 deprecates: nothing a caller can change.
        warnings.filterwarnings(
            "ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning
        )
        lora: nn.Module = peft.get_peft_model(model, config)
    return lora


class CausalLMLoss(nn.Module):
    """A causal LM called with its token ids as labels: ``forward(ids)`` returns its output,
    whose ``loss`` `loss_of` trains on (`PeakCase.labels`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Any:
        return self.model(input_ids=ids, labels=ids)


def environment() -> str:
    """One line naming what the figures were measured on."""
    threads = torch.get_num_threads()
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    return f"torch {torch.__version__}, {dev or platform.machine()}, {threads} threads"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loss_of(out: Any) -> Tensor:
    """The benchmarks' loss: the model's own when it computed one (`CausalLMLoss`), else the mean
    square of the output (logits or last hidden state)."""
    if getattr(out, "loss", None) is not None:
        return out.loss  # type: ignore[no-any-return]
    out = getattr(out, "logits", getattr(out, "last_hidden_state", out))
    return out.float().square().mean()  # type: ignore[no-any-return]


def measure(
    builders: Mapping[str, Callable[[bool], nn.Module]],
    inputs: tuple[Any, ...],
    repeats: int,
    device: torch.device,
    timed: Collection[str] = (),
) -> dict[str, tuple[float, float, float, float, float]]:
    """Bytes saved for backward and step times of each variant (``builders[v](for_memory)``).

    Returns, per variant: bytes held after the forward, peak bytes (nan for the variants in
    ``timed``, timed only), and the median, min and max step time in ms over ``repeats``
    interleaved steps (nan when ``repeats`` is 0).
    """
    memory: dict[str, tuple[float, float]] = {
        v: (math.nan, math.nan) if v in timed else saved_bytes(build(True), inputs)
        for v, build in builders.items()
    }
    times = step_times({v: build(False) for v, build in builders.items()}, inputs, repeats, device)
    results: dict[str, tuple[float, float, float, float, float]] = {}
    for variant in builders:
        t = times[variant] or [float("nan")]
        results[variant] = (*memory[variant], statistics.median(t), min(t), max(t))
    return results


def saved_bytes(model: nn.Module, inputs: tuple[Any, ...]) -> tuple[int, int]:
    """Bytes saved for backward over one step (parameters excluded): after the forward, peak."""
    with SavedTensorMeter(ignore=model.parameters()) as meter:
        loss = loss_of(model(*inputs))
        after_forward = meter.current
        loss.backward()  # type: ignore[no-untyped-call]
    return after_forward, meter.peak


class _WindowMeter(SavedTensorMeter):
    """A `SavedTensorMeter` that counts only while ``active``."""

    active = False

    def _pack(self, tensor: Tensor) -> Any:
        return super()._pack(tensor) if self.active else tensor


def stack_saved_bytes(model: nn.Module, inputs: tuple[Any, ...], stack: nn.Module) -> int:
    """Bytes that ``stack`` (a submodule of ``model``) saves for backward and still holds when
    ``model``'s forward returns, parameters excluded: what a stack of blocks keeps alive while the
    rest of the model runs, without the embeddings' and the head's share.

    Tensors are counted while code inside ``stack``'s modules runs: from a call of ``stack`` or of
    one of its submodules to the next call of a module outside it (a parent's loop over its
    layers counts, its final norm and head do not). The forward's graph is freed, no backward runs.

    Examples:
        >>> body = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        >>> model = nn.Sequential(nn.Linear(4, 4), body, nn.Linear(4, 4))
        >>> stack_saved_bytes(model, (torch.randn(2, 4),), body)  # Linear's input, Tanh's output
        64
    """
    inside = {id(m) for m in stack.modules()}
    meter = _WindowMeter(ignore=model.parameters())

    def enter(module: nn.Module, args: Any) -> None:
        meter.active = id(module) in inside

    handle = nn.modules.module.register_module_forward_pre_hook(enter)
    try:
        with meter:
            out = model(*inputs)
            held = meter.current
    finally:
        handle.remove()
        meter.active = False
    del out
    return held


def step_times(
    models: Mapping[str, nn.Module], inputs: tuple[Any, ...], repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Step times in ms of each model over ``repeats`` interleaved rounds, after one round that
    warms up (none at all when ``repeats`` is 0); ``.grad`` is unset before every step."""
    times: dict[str, list[float]] = {v: [] for v in models}
    for r in range(repeats + 1 if repeats else 0):
        for variant, model in models.items():
            model.zero_grad(set_to_none=True)
            sync(device)
            start = time.perf_counter()
            loss_of(model(*inputs)).backward()  # type: ignore[no-untyped-call]
            sync(device)
            if r:
                times[variant].append(1e3 * (time.perf_counter() - start))
    return times
