"""A converted HuggingFace model the way HuggingFace users train it: `Trainer` with its defaults,
peft's LoRA, and `save_pretrained` / `from_pretrained`."""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from inertia import (
    InertiaError,
    MomentumLayerList,
    _hf_auto,
    from_pretrained,
    transform_to_momentumnet,
)
from inertia.testing import backprop_twin, relative_error

transformers = pytest.importorskip("transformers")


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=4, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    assert model.config.use_cache  # HuggingFace's default, which training turns off
    return model


def converted(model: nn.Module | None = None, **kwargs: Any) -> nn.Module:
    """GPT-2 with its blocks converted memory-free, with inertia's defaults (exact arithmetic)."""
    model = gpt2() if model is None else model
    options = {"keep_first_layer": False, "method": "memory_free", **kwargs}
    return transform_to_momentumnet(model, "transformer.h", **options)


def batches(n: int, size: int = 4, length: int = 12) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 100, (size, length), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


class Rows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, rows: list[dict[str, torch.Tensor]]) -> None:
        self.rows = [
            {k: v[i] for k, v in b.items()} for b in rows for i in range(len(b["input_ids"]))
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def train_with_trainer(model: nn.Module, out: Path, steps: int) -> list[float]:
    """HuggingFace's Trainer, its defaults but for the CPU, the step count and logging."""
    pytest.importorskip("accelerate")
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, seed=0, data_seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(batches(8)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the cache warning, once per forward
        trainer.train()
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def test_trainer_with_defaults_trains_as_backprop(tmp_path: Path) -> None:
    """Trainer (gradient accumulation, dropout, AdamW, HF's default use_cache=True): the
    memory-free model follows its backprop twin step for step: equal losses, and updates within
    1e-5 (the tied embedding sums its two gradients in another order, and AdamW carries the last
    bits on)."""
    free = converted()
    twin = backprop_twin(free)
    losses = [train_with_trainer(m, tmp_path / name, 3) for m, name in ((free, "f"), (twin, "t"))]
    assert len(losses[0]) == 3
    assert losses[0] == losses[1]
    # What training changed, globally: AdamW moves a weight whose gradient is rounding noise (the
    # key bias of attention, analytically zero) by the learning rate whatever the noise's size,
    # so single tensors of the two runs may differ where their gradients do not.
    start = dict(converted().named_parameters())
    updates = [
        torch.cat([(p - start[n]).detach().flatten() for n, p in m.named_parameters()])
        for m in (free, twin)
    ]
    assert relative_error(updates[0], updates[1]) <= 1e-5
    assert float(updates[0].norm()) > 0


# peft 0.21 calls an alias that transformers 5 deprecates.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_lora_memory_free_gradients() -> None:
    """peft's LoRA on a converted model (frozen base weights, adapters inside the blocks):
    gradients equal the backprop twin's, and only the adapters get any."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True
    )
    free = peft.get_peft_model(converted(), config)
    stack = free.get_submodule("base_model.model.transformer.h")
    assert isinstance(stack, MomentumLayerList)
    assert stack.exact
    twin = backprop_twin(free)
    batch = batches(1)[0]
    grads = []
    for model in (free, twin):
        model.train()
        torch.manual_seed(2)  # the same dropout masks
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # use_cache=True is dropped in training
            model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert grads[0]
    assert all("lora_" in name for name in grads[0])
    for name, g in grads[0].items():
        assert relative_error(g, grads[1][name]) <= 1e-6, name


def test_save_pretrained_round_trip(tmp_path: Path) -> None:
    """save_pretrained writes the conversion into config.json; from_pretrained applies it again,
    and HuggingFace's own Auto classes load the momentum model too."""
    model = converted(gamma=0.5).eval()
    model.save_pretrained(tmp_path)
    ids = batches(1)[0]["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
        loaded = from_pretrained(transformers.AutoModelForCausalLM, tmp_path)
        got = loaded(input_ids=ids).logits
    stack = loaded.get_submodule("transformer.h")
    assert isinstance(stack, MomentumLayerList)
    assert (stack.gamma, stack.use_backprop, stack.exact) == (0.5, False, True)
    assert torch.equal(got, want)
    assert len(loaded.config.inertia) == 1  # recorded once, not once per load
    gpt2().save_pretrained(tmp_path / "plain")
    with pytest.raises(InertiaError, match="records no inertia conversion"):
        from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "plain")


def test_huggingface_auto_classes_load_the_momentum_model(tmp_path: Path) -> None:
    """With inertia imported, AutoModelForCausalLM/AutoModel.from_pretrained on a converted save
    give the momentum model (HuggingFace's own kwargs honoured); config.json names inertia's
    model type, while the config in memory keeps GPT-2's for peft and the rest."""
    model = converted(gamma=0.5).eval()
    assert model.config.model_type == "gpt2"
    assert model.config.to_dict()["model_type"] == "gpt2"
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())
    assert record["model_type"] == _hf_auto.MODEL_TYPE
    assert record[_hf_auto.BASE_KEY] == "gpt2"
    ids = batches(1)[0]["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
        lm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
        assert isinstance(lm, transformers.GPT2LMHeadModel)
        assert isinstance(lm.get_submodule("transformer.h"), MomentumLayerList)
        assert torch.equal(lm.eval()(input_ids=ids).logits, want)
        base, info = transformers.AutoModel.from_pretrained(tmp_path, output_loading_info=True)
        assert isinstance(base.get_submodule("h"), MomentumLayerList)
        assert not info["missing_keys"]
        assert torch.equal(base.eval()(input_ids=ids).last_hidden_state, model.transformer(ids)[0])
        concrete = from_pretrained(transformers.GPT2LMHeadModel, tmp_path).eval()
        assert torch.equal(concrete(input_ids=ids).logits, want)
        wide = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
        assert {p.dtype for p in wide.parameters()} == {torch.float64}
        assert isinstance(wide.get_submodule("transformer.h"), MomentumLayerList)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert (config.n_layer, config.base_config().model_type) == (4, "gpt2")
    fresh = transformers.AutoModelForCausalLM.from_config(config)  # random weights, converted
    assert isinstance(fresh.get_submodule("transformer.h"), MomentumLayerList)
    assert fresh.get_submodule("transformer.h").gamma == 0.5
    # The config class survives a copy and a pickle, and so does what it saves.
    for copied in (copy.deepcopy(lm.config), pickle.loads(pickle.dumps(lm.config))):
        assert type(copied) is type(lm.config)
        assert json.loads(copied.to_json_string())["model_type"] == _hf_auto.MODEL_TYPE
    lm.save_pretrained(tmp_path / "again")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert isinstance(again.get_submodule("transformer.h"), MomentumLayerList)


def test_saves_from_before_the_model_type_still_load(tmp_path: Path) -> None:
    """A save whose config.json kept GPT-2's model type (inertia before 0.1): HuggingFace alone
    gives the original architecture, another function; from_pretrained converts it again."""
    model = converted(gamma=0.5).eval()
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())
    record["model_type"] = record.pop(_hf_auto.BASE_KEY)
    (tmp_path / "config.json").write_text(json.dumps(record))
    ids = batches(1)[0]["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = from_pretrained(transformers.AutoModelForCausalLM, tmp_path)(input_ids=ids).logits
        plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)(input_ids=ids).logits
    assert torch.equal(got, want)
    assert relative_error(plain, want) > 1e-2  # why the conversion must be applied again


def test_auto_classes_without_inertia_refuse_and_with_it_load(tmp_path: Path) -> None:
    """In a fresh interpreter: without inertia, AutoModelForCausalLM.from_pretrained refuses a
    converted save with an error naming inertia.from_pretrained; inertia imported before
    transformers (which it does not import) registers on transformers' first import."""
    converted(gamma=0.5).save_pretrained(tmp_path)
    without = f"""
import sys, transformers
try:
    transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
except ValueError as err:
    assert "inertia.from_pretrained" in str(err), err
    assert "inertia" not in sys.modules
    print("refused")
"""
    before = f"""
import sys, inertia
assert "transformers" not in sys.modules
import transformers
model = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
print(type(model.get_submodule("transformer.h")).__name__)
"""
    for code, out in ((without, "refused"), (before, "MomentumLayerList")):
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == out


def test_a_causal_lm_save_loads_as_its_base_model(tmp_path: Path) -> None:
    """The record holds stack paths relative to the base model: a GPT2LMHeadModel's save loads
    as GPT2Model (``AutoModel``), whose stack is ``h``, not ``transformer.h``, and back."""
    model = converted(gamma=0.5).eval()
    assert model.config.inertia[0]["residual_layers"] == ["h"]
    model.save_pretrained(tmp_path / "lm")
    ids = batches(1)[0]["input_ids"]
    base = from_pretrained(transformers.AutoModel, tmp_path / "lm").eval()
    assert isinstance(base.get_submodule("h"), MomentumLayerList)
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).last_hidden_state, model.transformer(ids)[0])
    base.save_pretrained(tmp_path / "base")
    again = from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "base")
    assert isinstance(again.get_submodule("transformer.h"), MomentumLayerList)


def test_huggingface_checkpointing_on_a_memory_free_stack_is_refused() -> None:
    """HF's checkpointing inside a memory-free stack would recompute every block twice more for
    no memory saved: training refuses it and names the switch; eval and backprop stacks run."""
    model = converted(gamma=0.5)
    model.config.use_cache = False
    model.activation_checkpointing_enable()
    ids = batches(1)[0]["input_ids"]
    with pytest.raises(InertiaError, match=r"blocks 0 to 3 .*activation_checkpointing_disable"):
        model(input_ids=ids, labels=ids)
    with torch.no_grad():
        model.eval()(input_ids=ids)  # no backward, nothing recomputed
    model.activation_checkpointing_disable()
    model.train()(input_ids=ids, labels=ids).loss.backward()


def test_weights_the_record_cannot_rebuild_are_refused(tmp_path: Path) -> None:
    """A stack given an init_function by hand saves its weights, which config.json cannot
    describe: from_pretrained refuses instead of dropping them."""
    model = converted(gamma=0.5)
    stack = model.get_submodule("transformer.h")
    stack.add_module("init", nn.Linear(32, 32))  # an init_function, set after the conversion
    stack.init_speed = True
    model.save_pretrained(tmp_path)
    with pytest.raises(InertiaError, match=r"transformer\.h\.init\.weight.*init_function"):
        from_pretrained(transformers.AutoModelForCausalLM, tmp_path)


def test_settings_changed_after_the_conversion_are_saved(tmp_path: Path) -> None:
    """The record follows the settings a stack may change after the conversion, so the save
    reloads as the model was, and a deep copy (the backprop twin) keeps a record of its own."""
    model = converted(gamma=0.5)
    stack = model.get_submodule("transformer.h")
    stack.gamma, stack.exact, stack.check_inversion, stack.inversion_tol = 0.7, True, "raise", 1e-3
    twin = backprop_twin(model)
    assert twin.config.inertia[0]["use_backprop"] is True
    assert model.config.inertia[0]["use_backprop"] is False
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(transformers.AutoModelForCausalLM, tmp_path).get_submodule(
        "transformer.h"
    )
    assert (loaded.gamma, loaded.use_backprop, loaded.exact) == (0.7, False, True)
    assert (loaded.check_inversion, loaded.inversion_tol) == ("raise", 1e-3)
