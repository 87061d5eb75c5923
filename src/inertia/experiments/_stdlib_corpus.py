"""The LLM experiment's text: a pinned snapshot of the docstrings of Python's standard library,
split by module."""

from __future__ import annotations

import gzip
import importlib
import inspect
import json
import sys
import warnings
from pathlib import Path
from typing import Any

__all__ = ["CORPUS", "HELD_OUT_EVERY", "corpus_python", "load_corpus", "pin_corpus", "split"]

CORPUS = Path(__file__).with_name("stdlib_docstrings.json.gz")
# Modules whose import has side effects (a browser, a window, printed text) or needs a display.
_UNSAFE = frozenset({"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"})
HELD_OUT_EVERY = 10  # every tenth module, in sorted order, is held out


def pin_corpus(path: Path | str = CORPUS) -> dict[str, str]:
    """Collect the standard library's docstrings into ``path`` (gzipped JSON) and return them.

    One text per public module: its docstring, then those of its public classes, their public
    methods and its public functions, in sorted order. The committed `CORPUS` was written with
    Python 3.11; rerunning under another version gives other text, which is why it is pinned.
    """
    modules: dict[str, str] = {}
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _UNSAFE:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated modules warn when imported
            try:
                module = importlib.import_module(name)
            except Exception:  # platform modules missing here, or failing at import
                continue
        text = _docstrings(module)
        if text:
            modules[name] = text
    record = {"python": sys.version.split()[0], "modules": modules}
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        json.dump(record, fh, ensure_ascii=False, sort_keys=True)
    return modules


def _docstrings(module: Any) -> str:
    name = module.__name__
    public = getattr(module, "__all__", None) or [a for a in dir(module) if not a.startswith("_")]
    parts = [inspect.getdoc(module) or ""]
    for attr in sorted(public):
        obj = getattr(module, attr, None)
        if getattr(obj, "__module__", None) != name:
            continue  # re-exported from elsewhere
        if inspect.isclass(obj):
            parts.append(inspect.getdoc(obj) or "")
            for method_name, method in sorted(vars(obj).items()):
                if not method_name.startswith("_") and inspect.isfunction(method):
                    parts.append(inspect.getdoc(method) or "")
        elif inspect.isfunction(obj):
            parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(p for p in parts if p.strip())


def load_corpus(path: Path | str = CORPUS) -> dict[str, str]:
    """The pinned docstrings, ``{module: text}`` in sorted module order."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        modules: dict[str, str] = json.load(fh)["modules"]
    return dict(sorted(modules.items()))


def split(modules: list[str]) -> tuple[list[str], list[str]]:
    """``(train, held_out)`` module names: every `HELD_OUT_EVERY`-th module in sorted order is held
    out, so that no module's text is on both sides."""
    names = sorted(modules)
    held = names[HELD_OUT_EVERY // 2 :: HELD_OUT_EVERY]
    return [n for n in names if n not in set(held)], held


def corpus_python() -> str:
    """The Python version that wrote `CORPUS`."""
    with gzip.open(CORPUS, "rt", encoding="utf-8") as fh:
        return str(json.load(fh)["python"])
