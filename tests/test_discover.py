"""residual_layers="auto": the stacks found on each family are exactly the expected ones."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torchvision import models as tvm

from inertia import InertiaError, MomentumNet, find_residual_stacks, transform_to_momentumnet
from test_transform_hf import FAMILIES, example

STAGES = ["layer1", "layer2", "layer3", "layer4"]


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_resnets(name: str) -> None:
    model = getattr(tvm, name)(num_classes=10)
    assert find_residual_stacks(model, torch.randn(1, 3, 32, 32)) == STAGES
    # Without keep_first_layer, stages whose first block changes the shape are not stacks.
    assert find_residual_stacks(model, torch.randn(1, 3, 32, 32), keep_first_layer=False) == (
        ["layer1"] if name == "resnet18" else []
    )


def test_nn_transformer() -> None:
    model = nn.Transformer(16, 2, 2, 2, 32, batch_first=True)
    inputs = (torch.randn(2, 5, 16), torch.randn(2, 4, 16))
    found = find_residual_stacks(model, inputs, keep_first_layer=False)
    assert found == ["encoder.layers", "decoder.layers"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bert", "encoder.layer"),
        ("gpt2", "transformer.h"),
        ("llama", "model.layers"),
        ("vit", "blocks"),
    ],
)
def test_hf_and_timm(name: str, expected: str) -> None:
    model = FAMILIES[name][0]()
    inputs = example(name)
    example_inputs = (
        inputs[0] if name == "vit" else {"input_ids": inputs[0], "attention_mask": inputs[1]}
    )
    assert find_residual_stacks(model, example_inputs, keep_first_layer=False) == [expected]


def test_auto_converts_and_reports(caplog: pytest.LogCaptureFixture) -> None:
    model = tvm.resnet18(num_classes=10).train()
    with caplog.at_level(logging.INFO, logger="inertia"):
        converted = transform_to_momentumnet(
            model, "auto", example_inputs=torch.randn(1, 3, 32, 32)
        )
    assert "converting layer1, layer2, layer3, layer4" in caplog.text
    assert all(isinstance(converted.get_submodule(s), MomentumNet) for s in STAGES)
    assert model.training  # the search restored the modes
    assert int(model.bn1.num_batches_tracked) == 0  # and ran in eval mode: no statistics update


def test_auto_needs_example_inputs_and_a_stack() -> None:
    with pytest.raises(TypeError, match="pass example_inputs"):
        transform_to_momentumnet(tvm.resnet18(), "auto")
    with pytest.raises(InertiaError, match="found no stack of same-shape blocks in Linear"):
        transform_to_momentumnet(nn.Linear(3, 3), "auto", example_inputs=torch.randn(2, 3))
