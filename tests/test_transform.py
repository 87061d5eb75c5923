"""transform_to_momentumnet on torchvision ResNets: weights kept, fidelity, gradient parity."""

from __future__ import annotations

import io

import pytest
import torch
from torch import Tensor, nn
from torchvision import models as tvm

from inertia import InertiaError, MomentumNet, transform_to_momentumnet
from inertia.testing import TOLERANCES, assert_gradients_match, relative_error

RESNETS = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]
STAGES = ("layer1", "layer2", "layer3", "layer4")


def small_resnet(name: str = "resnet18") -> nn.Module:
    return getattr(tvm, name)(num_classes=10)


@pytest.mark.parametrize("name", RESNETS)
def test_every_torchvision_resnet_converts(name: str) -> None:
    model = small_resnet(name)
    keys = list(model.state_dict())
    n_params = sum(p.numel() for p in model.parameters())
    converted = transform_to_momentumnet(model, inplace=True)
    assert converted is model
    for stage in STAGES:
        layer = converted.get_submodule(stage)
        assert isinstance(layer, MomentumNet)
        assert layer.keep_first == 1
        assert layer.use_backprop is False
    assert list(converted.state_dict()) == keys
    assert sum(p.numel() for p in converted.parameters()) == n_params
    # BatchNorm in train mode over a batch of 2 at layer4's 1x1 resolution is so sensitive to its
    # input that a float32 reconstruction one ulp off is amplified beyond the inversion check's
    # tolerance (it warns, rightly); 8 samples keep the statistics well conditioned.
    x = torch.randn(8, 3, 32, 32)
    out = converted(x)
    assert out.shape == (8, 10)
    out.sum().backward()
    for pname, p in converted.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


def test_weights_load_both_ways() -> None:
    original = small_resnet()
    converted = transform_to_momentumnet(original)
    assert converted is not original  # a deep copy by default, as in momentumnet
    other = small_resnet()
    converted.load_state_dict(other.state_dict(), strict=True)
    other.load_state_dict(converted.state_dict(), strict=True)
    for (ka, a), (kb, b) in zip(
        converted.state_dict().items(), other.state_dict().items(), strict=True
    ):
        assert ka == kb
        assert torch.equal(a, b)


@pytest.mark.parametrize("train", [True, False])
def test_gamma_zero_is_the_original(train: bool) -> None:
    original = small_resnet().double().train(train)
    converted = transform_to_momentumnet(original, gamma=0.0, use_backprop=True)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    # x + (g(x) - x) rounds differently from g(x) in the last bit: float64 tolerance.
    assert relative_error(converted(x), original(x)) <= TOLERANCES[torch.float64]


def test_gamma_zero_with_the_default_checkpoints_each_block() -> None:
    """momentumnet's example, transform_to_momentumnet(resnet, gamma=0.0): memory-free is
    impossible at gamma 0, so the plan checkpoints each block; forced memory-free, the stacks
    train with backprop after a warning."""
    original = small_resnet().double()
    converted = transform_to_momentumnet(original, gamma=0.0)
    assert {s.method for s in converted.inertia_plan.stacks} == {"checkpoint"}
    assert converted.inertia_plan["layer1"].reason == "gamma=0 cannot be inverted"
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    assert relative_error(converted(x), original(x)) <= TOLERANCES[torch.float64]
    converted(x).sum().backward()
    with pytest.warns(UserWarning, match="trains with backprop"):
        transform_to_momentumnet(original, gamma=0.0, method="memory_free")


def momentum_loop(model: nn.Module, x: Tensor, gamma: float) -> Tensor:
    """torchvision's ResNet forward, with each stage written as a momentum loop."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    for stage in STAGES:
        blocks = list(model.get_submodule(stage).children())
        x = blocks[0](x)
        v = torch.zeros_like(x)
        for block in blocks[1:]:
            v = gamma * v + (1 - gamma) * (block(x) - x)
            x = x + v
    return model.fc(torch.flatten(model.avgpool(x), 1))


def test_gamma_point_nine_is_a_momentum_loop() -> None:
    model = small_resnet().double().train()
    converted = transform_to_momentumnet(model, gamma=0.9, use_backprop=True)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    expected = momentum_loop(model, x, 0.9)
    assert torch.equal(converted(x), expected)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_memory_free_gradients_match(name: str, dtype: torch.dtype, exact: bool) -> None:
    model = small_resnet(name).to(dtype).train()
    backprop = transform_to_momentumnet(model, gamma=0.9, use_backprop=True, exact=exact)
    free = transform_to_momentumnet(model, gamma=0.9, exact=exact, method="memory_free")
    x = torch.randn(4, 3, 32, 32, dtype=dtype, requires_grad=True)
    errors = assert_gradients_match(backprop, free, x, steps=2)
    assert errors["buffer.layer3.1.bn1.num_batches_tracked"] == 0.0


def _gradients(model: nn.Module, x: Tensor) -> Tensor:
    x = x.clone().requires_grad_()
    for _ in range(2):
        model(x).square().sum().backward()
    return torch.cat(
        [x.grad.double().flatten(), *(p.grad.double().flatten() for p in model.parameters())]
    )  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_default_memory_free_is_as_accurate_as_backprop(name: str) -> None:
    """With defaults (exact arithmetic), float32 memory-free gradients are as close to float64
    truth as float32 backprop's (measured: 8.5e-6 against 8.3e-6 on ResNet-18, 3.2e-4 against
    2.5e-4 on ResNet-50, whose BatchNorm on a batch of 4 amplifies rounding)."""
    model = small_resnet(name).train()
    x = torch.randn(4, 3, 32, 32)
    truth = _gradients(transform_to_momentumnet(model, use_backprop=True).double(), x.double())
    backprop = _gradients(transform_to_momentumnet(model, use_backprop=True), x)
    free = transform_to_momentumnet(model, method="memory_free")
    assert all(m.exact for m in free.modules() if isinstance(m, MomentumNet))
    assert relative_error(_gradients(free, x), truth) <= 2 * relative_error(backprop, truth)


def test_checkpointed_first_blocks_keep_gradients_and_statistics() -> None:
    model = small_resnet().double().train()
    free = transform_to_momentumnet(model, gamma=0.9, checkpoint_kept=False)
    checkpointed = transform_to_momentumnet(model, gamma=0.9, checkpoint_kept=True)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    errors = assert_gradients_match(free, checkpointed, x, steps=2)
    assert errors["buffer.layer2.0.bn1.running_mean"] <= TOLERANCES[torch.float64]
    assert int(checkpointed.layer2[0].bn1.num_batches_tracked) == 2


def test_sub_layers_alias_and_single_path() -> None:
    model = small_resnet()
    a = transform_to_momentumnet(model, sub_layers=["layer2"])
    b = transform_to_momentumnet(model, residual_layers="layer2")
    for converted in (a, b):
        assert isinstance(converted.layer2, MomentumNet)
        assert isinstance(converted.layer1, nn.Sequential)
    with pytest.raises(TypeError, match="not both"):
        transform_to_momentumnet(model, ["layer1"], sub_layers=["layer2"])


def test_keep_first_layer_false_names_the_fix() -> None:
    converted = transform_to_momentumnet(small_resnet(), keep_first_layer=False)
    with pytest.raises(InertiaError, match=r"block 0 \(BasicBlock\) maps shape"):
        converted(torch.randn(2, 3, 32, 32))


def test_unknown_path_lists_nearby_names() -> None:
    with pytest.raises(InertiaError, match=r"no submodule 'layer5'. Nearby names: layer4, layer3"):
        transform_to_momentumnet(small_resnet(), ["layer5"])


def test_path_that_is_not_a_stack() -> None:
    with pytest.raises(InertiaError, match=r"'fc' is a Linear, not a stack of blocks"):
        transform_to_momentumnet(small_resnet(), ["fc"])
    with pytest.raises(InertiaError, match="already a MomentumNet"):
        transform_to_momentumnet(transform_to_momentumnet(small_resnet()), ["layer1"])


def test_checkpointed_stem_keeps_gradients_and_saves_memory() -> None:
    from inertia.models.resnet import CheckpointedStemResNet
    from inertia.testing import SavedTensorMeter

    model = small_resnet().double().train()
    plain = transform_to_momentumnet(model, checkpoint_stem=False)
    stem = transform_to_momentumnet(model, checkpoint_stem=True)
    assert type(stem) is CheckpointedStemResNet
    assert list(stem.state_dict()) == list(model.state_dict())
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64, requires_grad=True)
    errors = assert_gradients_match(plain, stem, x, steps=2)
    assert errors["buffer.bn1.num_batches_tracked"] == 0.0  # updated once per step
    peaks = []
    for m in (plain, stem):
        with SavedTensorMeter(ignore=m.parameters()) as meter:
            m(x).sum().backward()
        peaks.append(meter.peak)
    assert peaks[1] < 0.8 * peaks[0]
    buf = io.BytesIO()
    torch.save(stem, buf)  # a module-level class: the converted model pickles
    buf.seek(0)
    assert type(torch.load(buf, weights_only=False)) is CheckpointedStemResNet


def test_checkpoint_stem_needs_a_torchvision_resnet() -> None:
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, batch_first=True), 2)
    with pytest.raises(InertiaError, match="checkpoint_stem supports torchvision's ResNet"):
        transform_to_momentumnet(encoder, "layers", checkpoint_stem=True, inplace=True)
    assert type(encoder.layers) is nn.ModuleList  # nothing was converted
