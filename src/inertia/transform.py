"""`transform_to_momentumnet`: make the residual stacks of an existing model momentum stacks."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from . import _hf_auto
from ._discover import find_residual_stacks
from ._errors import InertiaError
from ._layerlist import MomentumLayerList
from .nn import MomentumNet
from .plan import Plan, StackPlan, check_method, plan_stack

__all__ = ["find_residual_stacks", "from_pretrained", "transform_to_momentumnet"]

_log = logging.getLogger("inertia")

_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


def transform_to_momentumnet(
    model: nn.Module,
    residual_layers: Sequence[str] | str | None = _RESNET_STAGES,
    keep_first_layer: bool = True,
    gamma: float = 0.9,
    use_backprop: bool = False,
    is_residual: bool = False,
    *,
    inplace: bool = False,
    example_inputs: Any = None,
    sub_layers: Sequence[str] | str | None = None,
    method: str = "auto",
    checkpoint_kept: bool | None = None,
    checkpoint_stem: bool | None = None,
    check_inversion: str | None = "warn",
    inversion_tol: float | None = None,
    exact: bool | None = None,
    fraction_bits: int | None = None,
) -> nn.Module:
    """Return ``model`` with each stack of blocks at ``residual_layers`` made a `MomentumNet`.

    The positional order and defaults are those of ``momentumnet`` 0.10. Each stack is replaced by
    a `MomentumNet` holding the same block objects under the same names, so the model's
    ``state_dict`` keeps its keys and their order and the parameter count is unchanged: weights
    load in both directions with ``strict=True``, before or after conversion. An
    ``nn.Sequential`` (a torchvision ResNet's ``layer1``, a timm ViT's ``blocks``) becomes a
    `MomentumNet`; an ``nn.ModuleList`` that the parent loops over (``nn.TransformerEncoder``'s
    ``layers``, HuggingFace's ``encoder.layer``, ``transformer.h``, ``model.layers``) becomes a
    `MomentumLayerList`, which keeps the parent's loop, its masks and keyword arguments working.

    Args:
        model: The model to convert.
        residual_layers: Dotted paths of the stacks (``"layer1"``, ``"encoder.blocks"``). A single
            string is one path. ``"auto"``: the stacks that `find_residual_stacks` finds by running
            the model on ``example_inputs``; they are logged (logger ``"inertia"``, level INFO).
        keep_first_layer: Run each stack's first block as an ordinary layer; it may change the
            shape (stride, channels), as the first block of a ResNet stage does.
        gamma: The momentum, as in `MomentumNet`.
        use_backprop: False (the default, as in ``momentumnet``): save memory, each stack the
            way ``method`` chooses. True: plain autograd everywhere.
        is_residual: False (the default): each block is a whole map ``g(x)``, as torchvision's
            ``BasicBlock`` and ``Bottleneck`` are (they add their own skip connection), and the
            momentum update uses ``f(x) = g(x) - x``. With ``gamma=0`` the converted model then
            computes exactly what the original computed.
        inplace: Convert ``model`` itself instead of a deep copy (no second copy of the weights).
        example_inputs: For ``residual_layers="auto"``: a tensor, a tuple of positional
            arguments or a dict of keyword arguments for one forward pass.
        sub_layers: ``momentumnet``'s name for ``residual_layers``.
        method: How each stack saves memory where ``use_backprop=False``: ``"auto"`` (the
            default) chooses per stack by the bytes each method keeps (`inertia.plan`):
            memory-free for a stack long enough to keep at most four fifths of the bytes that
            checkpointing each block keeps (three float32 blocks and more in exact arithmetic),
            checkpointing for a shorter one. ``"memory_free"`` or ``"checkpoint"`` forces one
            method on every stack (`MomentumNet`'s ``method``). The plan is logged (logger
            ``"inertia"``, level INFO) and kept as ``model.inertia_plan``
            (``print(model.inertia_plan)`` shows it with its byte counts).
        checkpoint_kept: Checkpoint the kept first blocks (see `MomentumNet`), which then keep
            their input only. None (the default): where ``use_backprop=False``.
        checkpoint_stem: For a torchvision ResNet, also checkpoint the stem (``conv1`` to
            ``maxpool``), whose activations are the model's largest. None (the default): a
            torchvision ResNet's where ``use_backprop=False``; True for another model is an
            error.
        check_inversion: As in `MomentumNet`.
        inversion_tol: As in `MomentumNet`.
        exact: Fixed-point arithmetic with a bit-exact inverse, as in `MomentumNet`: None (the
            default) is exact whenever the backward is memory-free, decided by each stack at
            each forward.
        fraction_bits: As in `MomentumNet`.

    Returns:
        The converted model (``model`` itself when ``inplace``).

    Examples:
        >>> from torchvision.models import resnet18
        >>> mresnet = transform_to_momentumnet(resnet18(), gamma=0.9)
        >>> type(mresnet.layer1).__name__, len(mresnet.layer1)
        ('MomentumNet', 2)
    """
    if sub_layers is not None:
        if residual_layers not in (None, _RESNET_STAGES):
            raise TypeError("pass residual_layers or its alias sub_layers, not both.")
        residual_layers = sub_layers
    if residual_layers is None:
        raise TypeError("residual_layers is None; pass the dotted paths of the stacks to convert.")
    if residual_layers == "auto":
        if example_inputs is None:
            raise TypeError(
                "residual_layers='auto' runs the model once to find its stacks: pass "
                "example_inputs (a tensor, a tuple of arguments or a dict of keyword arguments)."
            )
        residual_layers = find_residual_stacks(model, example_inputs, keep_first_layer)
        if not residual_layers:
            raise InertiaError(
                f"found no stack of same-shape blocks in {type(model).__name__} (an nn.Sequential "
                "or nn.ModuleList of at least two blocks, each applied to the previous one's "
                "output); pass residual_layers explicitly."
            )
        _log.info("transform_to_momentumnet: converting %s", ", ".join(residual_layers))
    paths = [residual_layers] if isinstance(residual_layers, str) else list(residual_layers)
    if not paths:
        raise ValueError("residual_layers is empty: there is nothing to convert.")
    check_method(method)  # before anything is changed
    if checkpoint_kept is None:
        checkpoint_kept = not use_backprop
    resnet = _torchvision_resnet(model)
    if checkpoint_stem is None:
        checkpoint_stem = resnet and not use_backprop
    if not inplace:
        model = copy.deepcopy(model)
    if checkpoint_stem:  # first: it checks the model's type before anything is changed
        from .models._stem import checkpoint_stem as checkpoint_resnet_stem  # needs torchvision

        checkpoint_resnet_stem(model)
    converted_stacks: list[MomentumNet] = []
    plans: list[StackPlan] = []
    for path in paths:
        stack = _resolve(model, path)
        keep_first = 1 if keep_first_layer and len(stack) > 0 else 0
        plan = plan_stack(
            path,
            len(stack) - keep_first,
            kept=keep_first,
            dtype=_dtype(stack),
            gamma=gamma,
            exact=exact,
            method=method,
            checkpoint_kept=checkpoint_kept,
        )
        saving = plan.method  # with use_backprop=True too: for a later use_backprop=False
        if use_backprop:
            plan = dataclasses.replace(plan, method="backprop", reason="use_backprop=True")
        plans.append(plan)
        # A ModuleList has no forward: its parent loops over it, and needs MomentumLayerList.
        cls = MomentumLayerList if isinstance(stack, nn.ModuleList) else MomentumNet
        converted = cls(
            list(stack),
            gamma,
            use_backprop=use_backprop,
            is_residual=is_residual,
            check_inversion=check_inversion,
            inversion_tol=inversion_tol,
            exact=exact,
            fraction_bits=fraction_bits,
            keep_first=keep_first,
            checkpoint_kept=checkpoint_kept,
            method=saving,
        )
        converted.train(stack.training)
        converted_stacks.append(converted)
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, converted)
        if isinstance(parent, nn.TransformerEncoder):
            # Its nested-tensor fast path (eval mode with a padding mask) hands the layers nested
            # tensors, which have no fixed shape to keep; the padded path computes the same.
            parent.use_nested_tensor = False
    new = Plan(tuple(plans), checkpoint_stem if resnet else None)
    previous = getattr(model, "inertia_plan", None)
    model.inertia_plan = previous + new if isinstance(previous, Plan) else new  # type: ignore[assignment]
    _log.info("transform_to_momentumnet: %s", new)
    _record(
        model,
        converted_stacks,
        {
            "residual_layers": paths,
            "keep_first_layer": keep_first_layer,
            "gamma": gamma,
            "use_backprop": use_backprop,
            "is_residual": is_residual,
            "method": method,
            "checkpoint_kept": checkpoint_kept,
            "check_inversion": check_inversion,
            "inversion_tol": inversion_tol,
            "exact": exact,
            "fraction_bits": fraction_bits,
        },
    )
    return model


def _torchvision_resnet(model: nn.Module) -> bool:
    """Whether ``model`` is a torchvision ``ResNet`` (its stem can be checkpointed), without
    importing torchvision."""
    cls = type(model)
    return cls.__name__ in ("ResNet", "CheckpointedStemResNet") and cls.__module__ in (
        "torchvision.models.resnet",
        "inertia.models._stem",
    )


def _dtype(stack: nn.Module) -> torch.dtype:
    """The dtype of a stack's floating-point parameters (its activation's), else the default."""
    for p in stack.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _record(model: nn.Module, stacks: list[MomentumNet], settings: dict[str, Any]) -> None:
    """Note the conversion in a HuggingFace model's config (``config.inertia``, one entry per
    stack), so that ``save_pretrained`` writes it to ``config.json`` and `from_pretrained` can
    apply it again. Each stack keeps its entry and updates it when a setting that may change
    after construction (gamma, use_backprop, exact, check_inversion, inversion_tol) is set."""
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(config, "to_json_string", None)):
        return  # not a HuggingFace model
    # Paths relative to the base model, so that a causal LM's save loads as its base model
    # (``AutoModel``: ``layers``, not ``model.layers``) and the other way round.
    base = _base_prefix(model)
    entries = []
    for path, stack in zip(settings["residual_layers"], stacks, strict=True):
        entry = {**settings, "residual_layers": [path.removeprefix(base)]}
        stack._inertia_record = entry
        entries.append(entry)
    config.inertia = [*(getattr(config, "inertia", None) or []), *entries]
    _hf_auto.momentum_config(config)  # its config.json then loads as a momentum model


def _base_prefix(model: nn.Module) -> str:
    """``"model."`` in a HuggingFace model with a head around its base model (the
    ``base_model_prefix`` child), ``""`` in a base model."""
    prefix = getattr(model, "base_model_prefix", "")
    child = getattr(model, prefix, None) if prefix else None
    return f"{prefix}." if isinstance(child, nn.Module) else ""


#: ``from_pretrained``'s arguments that say where the files are, which the config is read with.
_HUB_KWARGS = (
    "cache_dir",
    "force_download",
    "local_files_only",
    "proxies",
    "revision",
    "subfolder",
    "token",
)


def from_pretrained(model_class: Any, path: Any, *args: Any, **kwargs: Any) -> nn.Module:
    """Load a HuggingFace model saved after `transform_to_momentumnet`, converted again.

    `transform_to_momentumnet` notes the conversion in the config (``config.inertia``), which
    ``save_pretrained`` writes to ``config.json`` under a ``model_type`` of inertia's own. With
    inertia imported, HuggingFace's Auto classes load such a save through this function
    (``AutoModelForCausalLM.from_pretrained(path)`` gives the momentum model); without inertia they
    refuse it, naming this function. It builds ``model_class`` (an Auto class, or the original
    class: ``LlamaForCausalLM``...) from the original config, loads the weights and applies the
    recorded conversion again, in place. Saves whose ``config.json`` kept the original
    ``model_type`` (written before inertia recorded its own) load through it too; HuggingFace
    alone gives them the original architecture, another function.

    Args:
        model_class: The HuggingFace class to load with: ``AutoModelForCausalLM``, ``AutoModel``
            (a causal LM's save then loads as its base model, converted) or a concrete class.
        path: The save's folder or Hub name.
        *args: Passed to ``model_class.from_pretrained``.
        **kwargs: Passed to ``model_class.from_pretrained`` (``dtype``, ``revision``...).

    Raises:
        InertiaError: The checkpoint's config records no conversion (it was saved from a model
            that `transform_to_momentumnet` did not convert), or it holds weights inside a stack
            that the recorded conversion does not rebuild (an ``init_function`` added by hand).
    """
    return load_saved(model_class, path, *args, **kwargs)[0]


def load_saved(
    model_class: Any, path: Any, *args: Any, **kwargs: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """`from_pretrained`, and HuggingFace's loading info (missing and unexpected keys...)."""
    _hf_auto.register()
    config: Any = kwargs.get("config")
    if config is None and not hasattr(model_class, "_model_mapping"):
        # A concrete class would read inertia's config.json as one of its own type.
        from transformers import AutoConfig

        hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        config = AutoConfig.from_pretrained(path, **hub)
    if _hf_auto.is_saved_conversion(config):
        kwargs["config"] = config.base_config()
    model, info = model_class.from_pretrained(path, *args, output_loading_info=True, **kwargs)
    if not any(isinstance(m, MomentumNet) for m in model.modules()):  # not through the loader
        convert_recorded(model, info, path, getattr(model_class, "__name__", "its class"))
    return model, info


def convert_recorded(model: nn.Module, info: dict[str, Any], path: Any, loader: str) -> None:
    """Apply the conversion recorded in a loaded model's config again, in place (``info``:
    HuggingFace's loading info, whose unexpected keys inside a stack are refused)."""
    conversions = getattr(getattr(model, "config", None), "inertia", None)
    if not conversions:
        raise InertiaError(
            f"{path!s} records no inertia conversion in its config (no 'inertia' entry in "
            "config.json): it was not saved from a converted model. Load it with "
            f"{loader}.from_pretrained and convert it with transform_to_momentumnet."
        )
    hf: Any = model  # HuggingFace's attributes, which nn.Module's typing does not know
    hf.config.inertia = None  # the calls below record each conversion again
    base = _base_prefix(model)
    stacks = []
    for settings in conversions:
        paths = [base + p for p in settings["residual_layers"]]
        transform_to_momentumnet(model, inplace=True, **{**settings, "residual_layers": paths})
        stacks += paths
    # Weights saved inside a stack that the recorded conversion does not rebuild (a stack's
    # init_function, set by hand): HuggingFace drops them with a log line; they are refused here.
    lost = [
        k for k in info.get("unexpected_keys", ()) if any(k.startswith(f"{p}.") for p in stacks)
    ]
    if lost:
        raise InertiaError(
            f"{path!s} holds weights inside its momentum stacks that the recorded conversion "
            f"does not rebuild: {', '.join(sorted(lost)[:5])}{' ...' if len(lost) > 5 else ''}. "
            "They come from a stack changed after transform_to_momentumnet (an init_function, "
            f"say), which config.json cannot describe; load the model with {loader}."
            "from_pretrained, convert it, then rebuild that part and load its weights yourself."
        )


def _resolve(model: nn.Module, path: str) -> nn.Sequential | nn.ModuleList:
    names = dict(model.named_modules())
    if path not in names:
        near = difflib.get_close_matches(path, [n for n in names if n], n=5, cutoff=0.5)
        hint = f" Nearby names: {', '.join(near)}." if near else ""
        top = ", ".join(n for n, _ in model.named_children())
        raise InertiaError(
            f"{type(model).__name__} has no submodule {path!r}.{hint} Its top-level children are: "
            f"{top}."
        )
    stack = names[path]
    if isinstance(stack, MomentumNet):
        raise InertiaError(f"{path!r} is already a MomentumNet; convert each stack once.")
    if not isinstance(stack, (nn.Sequential, nn.ModuleList)):
        raise InertiaError(
            f"{path!r} is a {type(stack).__name__}, not a stack of blocks: give the path of an "
            "nn.Sequential or nn.ModuleList of blocks (for a torchvision ResNet, 'layer1' to "
            "'layer4'; for nn.TransformerEncoder, 'layers')."
        )
    return stack
