"""Momentum ResNets in the paper's form, built from torchvision's ResNets.

Each model is torchvision's ``resnetXX`` (random weights, same ``state_dict`` keys) in which, in
each stage ``layer1`` ... ``layer4``, the first block stays an ordinary torchvision block (it may
change the shape) and the others are the residual ``f`` of the momentum update
``v = gamma * v + (1 - gamma) * f(x); x = x + v``: their skip connection and the ReLU after the sum
are dropped (`MomentumBasicBlock`, `MomentumBottleneck`). Each stage is then a `MomentumNet` with
``keep_first=1``. With ``gamma=0`` this is a ResNet without the ReLU after each sum.

The ``_cifar`` variants have the CIFAR stem: ``conv1`` is a 3x3 stride-1 convolution and there is
no max pool, so 32x32 images reach ``layer4`` at 4x4. Their keys are torchvision's too; only
``conv1.weight`` has another shape.

Every builder takes the same keyword arguments:

Args:
    num_classes: Outputs of ``fc``; 1000 (ImageNet stem) or 10 (CIFAR stem) by default.
    gamma: The momentum, as in `MomentumNet` (the paper uses 0.9).
    use_backprop: False: save memory, each stage the way its plan chooses
        (`transform_to_momentumnet`'s ``method``). True: ordinary autograd.
    method: ``"auto"`` (default: each stage's plan, `inertia.plan`), ``"memory_free"`` or
        ``"checkpoint"``.
    checkpoint_kept: Checkpoint each stage's first block (see `MomentumNet`). Default None: where
        ``use_backprop=False``.
    checkpoint_stem: Run the stem (``conv1``, ``bn1``, ``relu``, ``maxpool``) under
        ``torch.utils.checkpoint``, so that its large activations are not stored. Default None:
        where ``use_backprop=False``.
    init_speed: Start each stage's velocity at ``v_0 = init(x)``, where ``init`` is a freshly
        initialised block of the stage's kind (child ``layerN.init``: it adds parameters and
        ``state_dict`` keys, so torchvision's weights then load with ``strict=False``). Default
        False: ``v_0 = 0``.
    exact: Fixed-point momentum, whose memory-free backward rebuilds every activation bit for
        bit (see `MomentumNet`). Default None: exact exactly when memory-free.
    **kwargs: Passed to torchvision's constructor (``zero_init_residual``, ``width_per_group``,
        ``groups``, ``norm_layer``...). Not ``weights``: load torchvision's weights afterwards with
        ``model.load_state_dict(weights.get_state_dict(), strict=True)`` (ImageNet stem).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn
from torchvision.models import resnet as tv

from ..nn import MomentumNet
from ..transform import transform_to_momentumnet
from ._registry import register_model
from ._stem import CheckpointedStemResNet, checkpoint_stem

__all__ = [
    "CheckpointedStemResNet",
    "MomentumBasicBlock",
    "MomentumBottleneck",
    "checkpoint_stem",
    "momentum_resnet18",
    "momentum_resnet18_cifar",
    "momentum_resnet34",
    "momentum_resnet34_cifar",
    "momentum_resnet50",
    "momentum_resnet50_cifar",
    "momentum_resnet101",
    "momentum_resnet101_cifar",
    "momentum_resnet152",
    "momentum_resnet152_cifar",
]

_STAGES = ("layer1", "layer2", "layer3", "layer4")


class MomentumBasicBlock(tv.BasicBlock):  # type: ignore[misc]
    """torchvision's ``BasicBlock`` reduced to its residual branch, same parameter names.

    ``forward(x)`` returns ``bn2(conv2(relu(bn1(conv1(x)))))``, of the shape ``(B, C, H, W)`` of
    ``x``: no skip connection, no ReLU after it. The in-place ReLU only touches intermediates.
    """

    def forward(self, x: Tensor) -> Tensor:
        f: Tensor = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return f


class MomentumBottleneck(tv.Bottleneck):  # type: ignore[misc]
    """torchvision's ``Bottleneck`` reduced to its residual branch, same parameter names.

    ``forward(x)`` returns ``bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x))))))))``, of the shape
    ``(B, C, H, W)`` of ``x``: no skip connection, no ReLU after it.
    """

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
        f: Tensor = self.bn3(self.conv3(h))
        return f


_MOMENTUM_BLOCKS: dict[type[nn.Module], type[nn.Module]] = {
    tv.BasicBlock: MomentumBasicBlock,
    tv.Bottleneck: MomentumBottleneck,
}


def _build(
    arch: str,
    cifar: bool,
    num_classes: int,
    gamma: float,
    use_backprop: bool,
    checkpoint_kept: bool | None,
    kwargs: dict[str, Any],
) -> nn.Module:
    if "weights" in kwargs:
        raise TypeError(
            "weights is not supported (inertia never downloads); build the model, then load "
            "torchvision's weights with model.load_state_dict(state_dict, strict=True)."
        )
    checkpoint_stem = kwargs.pop("checkpoint_stem", None)
    method = kwargs.pop("method", "auto")
    init_speed = bool(kwargs.pop("init_speed", False))
    exact = kwargs.pop("exact", None)
    model: nn.Module = getattr(tv, arch)(num_classes=num_classes, **kwargs)
    if cifar:
        conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision
        model.conv1, model.maxpool = conv1, nn.Identity()
    for stage in _STAGES:
        for block in list(model.get_submodule(stage).children())[1:]:
            block.__class__ = _MOMENTUM_BLOCKS[type(block)]  # same submodules, residual forward
    transform_to_momentumnet(
        model,
        gamma=gamma,
        use_backprop=use_backprop,
        is_residual=True,
        keep_first_layer=True,
        inplace=True,
        method=method,
        checkpoint_kept=checkpoint_kept,
        checkpoint_stem=checkpoint_stem,
        exact=exact,
    )
    if init_speed:
        for stage in _STAGES:
            net = model.get_submodule(stage)
            assert isinstance(net, MomentumNet)
            init = copy.deepcopy(net[1])
            for m in init.modules():
                if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                    m.reset_parameters()  # a fresh block, not a copy of the first one's weights
            net.add_module("init", init)
            net.init_speed = True
    return model


# One builder per registered name, as in timm; the arguments are documented above.
# fmt: off
@register_model
def momentum_resnet18(*, num_classes: int = 1000, gamma: float = 0.9, use_backprop: bool = False,
                      checkpoint_kept: bool | None = None, **kwargs: Any) -> nn.Module:
    """Momentum ResNet-18 (BasicBlock, stages of 2, 2, 2, 2), ImageNet stem."""
    return _build("resnet18", False, num_classes, gamma, use_backprop, checkpoint_kept, kwargs)


@register_model
def momentum_resnet34(*, num_classes: int = 1000, gamma: float = 0.9, use_backprop: bool = False,
                      checkpoint_kept: bool | None = None, **kwargs: Any) -> nn.Module:
    """Momentum ResNet-34 (BasicBlock, stages of 3, 4, 6, 3), ImageNet stem."""
    return _build("resnet34", False, num_classes, gamma, use_backprop, checkpoint_kept, kwargs)


@register_model
def momentum_resnet50(*, num_classes: int = 1000, gamma: float = 0.9, use_backprop: bool = False,
                      checkpoint_kept: bool | None = None, **kwargs: Any) -> nn.Module:
    """Momentum ResNet-50 (Bottleneck, stages of 3, 4, 6, 3), ImageNet stem."""
    return _build("resnet50", False, num_classes, gamma, use_backprop, checkpoint_kept, kwargs)


@register_model
def momentum_resnet101(*, num_classes: int = 1000, gamma: float = 0.9, use_backprop: bool = False,
                       checkpoint_kept: bool | None = None, **kwargs: Any) -> nn.Module:
    """Momentum ResNet-101 (Bottleneck, stages of 3, 4, 23, 3), ImageNet stem."""
    return _build("resnet101", False, num_classes, gamma, use_backprop, checkpoint_kept, kwargs)


@register_model
def momentum_resnet152(*, num_classes: int = 1000, gamma: float = 0.9, use_backprop: bool = False,
                       checkpoint_kept: bool | None = None, **kwargs: Any) -> nn.Module:
    """Momentum ResNet-152 (Bottleneck, stages of 3, 8, 36, 3), ImageNet stem."""
    return _build("resnet152", False, num_classes, gamma, use_backprop, checkpoint_kept, kwargs)


@register_model
def momentum_resnet18_cifar(*, num_classes: int = 10, gamma: float = 0.9,
                            use_backprop: bool = False, checkpoint_kept: bool | None = None,
                            **kwargs: Any) -> nn.Module:
    """Momentum ResNet-18, CIFAR stem (3x3 stride-1 ``conv1``, no max pool)."""
    return _build("resnet18", True, num_classes, gamma, use_backprop, checkpoint_kept, kwargs)


@register_model
def momentum_resnet34_cifar(*, num_classes: int = 10, gamma: float = 0.9,
                            use_backprop: bool = False, checkpoint_kept: bool | None = None,
                            **kwargs: Any) -> nn.Module:
    """Momentum ResNet-34, CIFAR stem (3x3 stride-1 ``conv1``, no max pool)."""
    return _build("resnet34", True, num_classes, gamma, use_backprop, checkpoint_kept, kwargs)


@register_model
def momentum_resnet50_cifar(*, num_classes: int = 10, gamma: float = 0.9,
                            use_backprop: bool = False, checkpoint_kept: bool | None = None,
                            **kwargs: Any) -> nn.Module:
    """Momentum ResNet-50, CIFAR stem (3x3 stride-1 ``conv1``, no max pool)."""
    return _build("resnet50", True, num_classes, gamma, use_backprop, checkpoint_kept, kwargs)


@register_model
def momentum_resnet101_cifar(*, num_classes: int = 10, gamma: float = 0.9,
                             use_backprop: bool = False, checkpoint_kept: bool | None = None,
                             **kwargs: Any) -> nn.Module:
    """Momentum ResNet-101, CIFAR stem (3x3 stride-1 ``conv1``, no max pool)."""
    return _build("resnet101", True, num_classes, gamma, use_backprop, checkpoint_kept, kwargs)


@register_model
def momentum_resnet152_cifar(*, num_classes: int = 10, gamma: float = 0.9,
                             use_backprop: bool = False, checkpoint_kept: bool | None = None,
                             **kwargs: Any) -> nn.Module:
    """Momentum ResNet-152, CIFAR stem (3x3 stride-1 ``conv1``, no max pool)."""
    return _build("resnet152", True, num_classes, gamma, use_backprop, checkpoint_kept, kwargs)
# fmt: on
