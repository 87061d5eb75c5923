"""The model registry and the momentum ResNets: every model trains, keys, parity, paper form."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torchvision import models as tvm

from inertia import InertiaError, MomentumNet
from inertia.models import _registry, create_model, list_models, register_model
from inertia.models.resnet import MomentumBasicBlock, MomentumBottleneck
from inertia.testing import assert_gradients_match, backprop_twin

CIFAR = [f"momentum_resnet{depth}_cifar" for depth in (18, 34, 50, 101, 152)]
STAGES = ("layer1", "layer2", "layer3", "layer4")


@pytest.mark.parametrize("name", list_models())
def test_every_model_trains(name: str) -> None:
    model = create_model(name).train()
    cifar = name.endswith("_cifar")
    num_classes = 10 if cifar else 1000
    # Batch 4, not 2: BatchNorm in train mode over 2 samples at layer4's 1x1 or 2x2 resolution makes
    # the float32 inversion ill-conditioned, and the inversion check then warns (rightly).
    x = torch.randn(4, 3, 32, 32) if cifar else torch.randn(4, 3, 64, 64)
    out = model(x)
    assert out.shape == (4, num_classes)
    (out * torch.randn_like(out)).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    for stage in STAGES:
        layer = model.get_submodule(stage)
        assert isinstance(layer, MomentumNet)
        assert (layer.keep_first, layer.gamma, layer.use_backprop) == (1, 0.9, False)
        assert type(layer[0]) in (tvm.resnet.BasicBlock, tvm.resnet.Bottleneck)
        assert all(type(b) in (MomentumBasicBlock, MomentumBottleneck) for b in list(layer)[1:])


def test_state_dict_is_torchvisions() -> None:
    model = create_model("momentum_resnet50")
    reference = tvm.resnet50()
    assert list(model.state_dict()) == list(reference.state_dict())
    model.load_state_dict(reference.state_dict(), strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference.state_dict()[key]), key


def test_cifar_stem() -> None:
    model = create_model("momentum_resnet18_cifar")
    keys = tvm.resnet18(num_classes=10).state_dict()
    assert list(model.state_dict()) == list(keys)
    conv1 = model.conv1
    assert isinstance(conv1, nn.Conv2d)
    assert (conv1.kernel_size, conv1.stride, conv1.padding, conv1.bias) == (
        (3, 3),
        (1, 1),
        (1, 1),
        None,
    )
    assert conv1.weight.shape == (64, 3, 3, 3)
    assert isinstance(model.maxpool, nn.Identity)


def test_arguments_reach_momentumnet_and_torchvision() -> None:
    model: Any = create_model(
        "momentum_resnet50_cifar",
        num_classes=7,
        gamma=0.5,
        use_backprop=True,
        checkpoint_kept=True,
        zero_init_residual=True,  # passed on to torchvision, with width_per_group
        width_per_group=128,
    )
    assert model.fc.out_features == 7
    for stage in STAGES:
        layer = model.get_submodule(stage)
        assert isinstance(layer, MomentumNet)
        assert (layer.gamma, layer.use_backprop, layer.checkpoint_kept) == (0.5, True, True)
    keys = tvm.wide_resnet50_2(num_classes=7).state_dict()
    assert {k: v.shape for k, v in model.state_dict().items() if k != "conv1.weight"} == {
        k: v.shape for k, v in keys.items() if k != "conv1.weight"
    }
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in model.layer3)  # zero_init_residual
    with pytest.raises(TypeError, match="weights is not supported"):
        create_model("momentum_resnet18", weights="IMAGENET1K_V1")


def test_memory_free_gradients_match_backprop() -> None:
    free = create_model("momentum_resnet18_cifar", method="memory_free").double().train()
    backprop = backprop_twin(free)
    for stage in STAGES:
        layer = backprop.get_submodule(stage)
        assert isinstance(layer, MomentumNet)
        assert layer.use_backprop
        assert layer.exact
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    errors = assert_gradients_match(backprop, free, x, steps=2)
    assert errors["buffer.layer4.1.bn2.num_batches_tracked"] == 0.0


def residual(block: Any, x: Tensor) -> Tensor:
    """The residual branch, written from the block's layers (not through its forward)."""
    relu = nn.functional.relu
    h = relu(block.bn1(block.conv1(x)))
    if isinstance(block, MomentumBottleneck):
        h = relu(block.bn2(block.conv2(h)))
        f: Tensor = block.bn3(block.conv3(h))
    else:
        f = block.bn2(block.conv2(h))
    return f


@pytest.mark.parametrize("name", ["momentum_resnet18_cifar", "momentum_resnet50_cifar"])
def test_paper_form_adds_the_residual_without_relu(name: str) -> None:
    model = create_model(name, gamma=0.0, use_backprop=True).double().train()
    stage = model.get_submodule("layer2")
    assert isinstance(stage, MomentumNet)
    blocks: list[Any] = list(stage)
    x = torch.randn(4, blocks[0].conv1.in_channels, 8, 8, dtype=torch.float64)
    expected = blocks[0](x)  # the first block: an ordinary torchvision block
    for block in blocks[1:]:
        expected = expected + residual(block, expected)  # no ReLU after the sum
    out = stage(x)
    torch.testing.assert_close(out, expected, rtol=0.0, atol=0.0)
    assert (out < 0).any()  # a torchvision block would end with a ReLU


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(
        InertiaError, match=r"unknown model 'momentum_resnet51'. Close matches: momentum_resnet50"
    ) as info:
        create_model("momentum_resnet51")
    assert "list_models()" in str(info.value)


def test_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_registry, "_MODELS", dict(_registry._MODELS))  # restored afterwards

    @register_model
    def tiny_test_model(*, width: int = 3) -> nn.Module:
        return nn.Linear(width, width)

    assert list_models("tiny_*") == ["tiny_test_model"]
    assert create_model("tiny_test_model", width=5).weight.shape == (5, 5)

    def momentum_resnet18() -> nn.Module:
        return nn.Identity()

    with pytest.raises(ValueError, match="'momentum_resnet18' is already registered"):
        register_model(momentum_resnet18)


def test_without_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_registry, "_MODELS", {})
    monkeypatch.delitem(sys.modules, "inertia.models.resnet")
    for module in ("torchvision", "torchvision.models"):
        monkeypatch.setitem(sys.modules, module, None)  # makes importing it fail
    assert list_models() == []
    with pytest.raises(InertiaError, match=r"need torchvision: pip install 'inertia\[vision\]'"):
        create_model("momentum_resnet18")


def test_list_models_pattern() -> None:
    assert list_models("*cifar") == sorted(CIFAR)
    assert len(list_models()) == 10
    assert list_models("no_such_*") == []


def test_init_speed_and_checkpointed_stem() -> None:
    free = create_model("momentum_resnet18_cifar", init_speed=True).double()
    backprop = backprop_twin(free)
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        net = free.get_submodule(stage)
        assert net.init_speed
        assert net.init_function is not None
        assert not net.use_backprop
    assert "layer1.init.conv1.weight" in free.state_dict()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    errors = assert_gradients_match(backprop, free, x, steps=2)
    assert "grad.layer3.init.bn2.weight" in errors
    stem = create_model("momentum_resnet18", checkpoint_stem=True)
    assert type(stem).__name__ == "CheckpointedStemResNet"
    stem(torch.randn(4, 3, 64, 64)).sum().backward()
