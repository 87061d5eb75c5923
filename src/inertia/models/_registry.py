"""The model registry: `register_model`, `create_model`, `list_models` (as in timm)."""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.util
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from .._errors import InertiaError

__all__ = ["create_model", "list_models", "register_model"]

ModelFn = TypeVar("ModelFn", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}

#: Modules whose models register themselves on the registry's first use rather than at
#: ``import inertia``: they import torchvision, an optional dependency that takes about a second.
_BUILTIN_MODULES = ("inertia.models.resnet",)


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        if module in sys.modules:  # loaded, or loading now (its own registrations call us)
            continue
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:  # without torchvision, only user models are listed
            if (err.name or "").partition(".")[0] != "torchvision":
                raise


def register_model(fn: ModelFn) -> ModelFn:
    """Register a model builder under its ``__name__``; use as a decorator.

    Args:
        fn: A function returning an ``nn.Module``; `create_model` passes its keyword arguments on.

    Returns:
        ``fn`` itself.

    Raises:
        ValueError: A model of that name is already registered.
    """
    _load_builtins()
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(
            f"a model named {name!r} is already registered "
            f"(by {_MODELS[name].__module__}); rename the function."
        )
    _MODELS[name] = fn
    return fn


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name``, with random weights.

    Args:
        name: A name from `list_models`.
        **kwargs: Passed to the model's builder (``num_classes``, ``gamma``, ``use_backprop``...).

    Returns:
        The model, in training mode.

    Raises:
        InertiaError: No model of that name; the message lists close matches.

    Examples:
        >>> model = create_model("momentum_resnet18_cifar", num_classes=100)
        >>> type(model.layer1).__name__, model.fc.out_features
        ('MomentumNet', 100)
    """
    _load_builtins()
    if name not in _MODELS:
        near = difflib.get_close_matches(name, list(_MODELS), n=5, cutoff=0.6)
        hint = f" Close matches: {', '.join(near)}." if near else ""
        if importlib.util.find_spec("torchvision") is None:
            hint += " The momentum ResNets need torchvision: pip install 'inertia[vision]'."
        raise InertiaError(
            f"unknown model {name!r}.{hint} Call inertia.models.list_models() for all "
            f"{len(_MODELS)} registered models."
        )
    return _MODELS[name](**kwargs)


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered models that match ``pattern``, sorted.

    Args:
        pattern: A shell-style pattern (``fnmatch``), such as ``"*cifar"``.

    Returns:
        The matching names, in alphabetical order.

    Examples:
        >>> list_models("momentum_resnet5*")
        ['momentum_resnet50', 'momentum_resnet50_cifar']
    """
    _load_builtins()
    return sorted(fnmatch.filter(_MODELS, pattern))
