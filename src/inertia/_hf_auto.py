"""HuggingFace's Auto classes and a converted model's save: the momentum model, or a clear error.

`transform_to_momentumnet` notes a conversion in a HuggingFace config (``config.inertia``) and
gives the config a subclass of its own class (`momentum_config`) that changes one thing: the
``config.json`` it writes names `MODEL_TYPE` as its ``model_type`` and keeps the original one under
`BASE_KEY`. In memory the config stays what it was (``model_type``, ``to_dict``, peft's defaults).

- Without inertia, HuggingFace does not know `MODEL_TYPE`, and ``AutoModel*.from_pretrained``
  fails with an error that quotes it, so that it names ``inertia.from_pretrained``, instead of
  returning the original architecture (another function) without a word.
- With inertia imported, `register` has registered `InertiaConfig` with ``AutoConfig`` and a loader
  with each Auto model class of `AUTO_CLASSES`: ``AutoModelForCausalLM.from_pretrained(path)``
  builds the original class from the original config, loads the weights and converts it again
  (`inertia.from_pretrained`).

`register` runs when inertia is imported if transformers already is, else right after
transformers is first imported (`install`): inertia never imports transformers itself.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

#: ``model_type`` of a converted model's ``config.json``; HuggingFace quotes it when it does not
#: know it, so it says what to do.
MODEL_TYPE = "inertia (import inertia, or load it with inertia.from_pretrained)"
#: The original ``model_type`` in a converted model's ``config.json``.
BASE_KEY = "inertia_base_model_type"
#: The Auto model classes that load a converted model's save as the momentum model.
AUTO_CLASSES = (
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForMaskedLM",
    "AutoModelForSeq2SeqLM",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
    "AutoModelForMultipleChoice",
    "AutoModelForImageClassification",
)

_CLASSES: dict[type, type] = {}  # original config class -> its momentum subclass
_REGISTERED: list[type] = []  # InertiaConfig, once registered


def momentum_config(config: Any) -> None:
    """Give a HuggingFace ``config`` the subclass of its class whose ``config.json`` names
    `MODEL_TYPE` (once; the config's values and in-memory behaviour are unchanged)."""
    base = type(config)
    if base in _CLASSES.values():
        return
    config.__class__ = _momentum_class(base)


def _momentum_class(base: type) -> type:
    if base not in _CLASSES:

        def to_json_string(self: Any, use_diff: bool = True) -> str:
            record = json.loads(base.to_json_string(self, use_diff))  # type: ignore[attr-defined]
            record[BASE_KEY] = record["model_type"]
            record["model_type"] = MODEL_TYPE
            return json.dumps(record, indent=2, sort_keys=True) + "\n"

        def __reduce_ex__(self: Any, protocol: Any) -> tuple[Any, ...]:
            # The class is made here, not importable by name: pickle rebuilds it from its base.
            return (_rebuild, (base, self.__dict__))

        _CLASSES[base] = type(
            base.__name__,
            (base,),
            {
                "__module__": base.__module__,
                "__qualname__": base.__qualname__,
                "to_json_string": to_json_string,
                "__reduce_ex__": __reduce_ex__,
            },
        )
    return _CLASSES[base]


def _rebuild(base: type, state: dict[str, Any]) -> Any:
    config: Any = object.__new__(_momentum_class(base))
    config.__dict__.update(state)
    return config


def is_saved_conversion(config: Any) -> bool:
    """Whether ``config`` was read from a converted model's save (an `InertiaConfig`)."""
    return bool(_REGISTERED) and type(config) is _REGISTERED[0]


def register() -> None:
    """Register `InertiaConfig` with ``AutoConfig`` and a loader with each of `AUTO_CLASSES`
    (once)."""
    if _REGISTERED:
        return
    import transformers
    from transformers import AutoConfig, PreTrainedConfig

    class InertiaConfig(PreTrainedConfig):  # type: ignore[no-untyped-call]
        """The config of a converted model's save, as ``AutoConfig`` reads it: the original
        config's values, its ``model_type`` under `BASE_KEY`; `base_config` rebuilds it."""

        model_type = MODEL_TYPE

        def base_config(self) -> Any:
            """The original model's config, with the recorded conversion (``inertia``)."""
            record = self.to_dict()
            record["model_type"] = record.pop(BASE_KEY)
            return transformers.CONFIG_MAPPING[record["model_type"]].from_dict(record)

    _REGISTERED.append(InertiaConfig)
    AutoConfig.register(MODEL_TYPE, InertiaConfig)
    for name in AUTO_CLASSES:
        auto = getattr(transformers, name, None)
        if auto is not None:
            auto.register(InertiaConfig, _loader(name, InertiaConfig))


def _loader(auto_name: str, config_class: type) -> type:
    """What ``transformers.<auto_name>`` calls for a converted model's save."""

    def from_pretrained(cls: type, path: Any, *args: Any, **kwargs: Any) -> Any:
        import transformers

        from .transform import load_saved

        info = kwargs.pop("output_loading_info", False)
        kwargs.pop("_from_auto", None)  # the Auto class's mark, which it sets again
        model, loading = load_saved(getattr(transformers, auto_name), path, *args, **kwargs)
        return (model, loading) if info else model

    def from_config(cls: type, /, config: Any, **kwargs: Any) -> Any:
        import transformers

        from .transform import convert_recorded

        model = getattr(transformers, auto_name).from_config(config.base_config(), **kwargs)
        convert_recorded(model, {}, "the config", auto_name)
        return model

    return type(
        f"Inertia{auto_name.removeprefix('Auto')}Loader",
        (),
        {
            "__module__": __name__,
            "__doc__": f"Loads a converted model's save for transformers.{auto_name}.",
            "config_class": config_class,
            "from_pretrained": classmethod(from_pretrained),
            "_from_config": classmethod(from_config),  # what Auto*.from_config calls
        },
    )


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``then`` right after the module ``name`` is first imported."""

    def __init__(self, name: str, then: Callable[[], None]) -> None:
        self.name, self.then = name, then

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenLoader(spec.loader, self.then)
        return spec


class _ThenLoader(importlib.abc.Loader):
    """A module's own loader, with ``then`` run after the module has executed."""

    def __init__(self, loader: Any, then: Callable[[], None]) -> None:
        self.loader, self.then = loader, then

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        module: ModuleType | None = self.loader.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        try:
            self.then()
        except Exception as err:  # never break the user's import; the Auto classes then refuse
            warnings.warn(
                f"inertia could not register its model type with transformers ({err!r}): load "
                "converted models' saves with inertia.from_pretrained.",
                RuntimeWarning,
                stacklevel=2,
            )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


def install() -> None:
    """`register` now if transformers is imported, else right after it is."""
    if "transformers" in sys.modules:
        register()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport("transformers", register))
