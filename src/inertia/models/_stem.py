"""A torchvision ResNet whose stem is checkpointed: `checkpoint_stem` (needs torchvision).

A module of its own, which imports neither `inertia.transform` nor `inertia.models.resnet`: the
first (``transform_to_momentumnet(checkpoint_stem=True)``) imports it without importing the
second, which imports the first.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.models import resnet as tv

from .._core import StatsOnce
from .._errors import InertiaError

__all__ = ["CheckpointedStemResNet", "checkpoint_stem"]


class CheckpointedStemResNet(tv.ResNet):  # type: ignore[misc]
    """torchvision's ``ResNet`` whose stem runs under ``torch.utils.checkpoint`` when autograd
    records: it stores only the image, and recomputes ``maxpool(relu(bn1(conv1(x))))`` in
    backward (with ``bn1``'s running statistics updated once). Same submodules and keys."""

    def _stem(self, x: Tensor) -> Tensor:
        out: Tensor = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return out

    def _forward_impl(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            x = checkpoint(StatsOnce(self._stem, self.bn1), x, use_reentrant=False)
        else:
            x = self._stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        out: Tensor = self.fc(torch.flatten(self.avgpool(x), 1))
        return out


def checkpoint_stem(model: nn.Module) -> None:
    """Make a torchvision ``ResNet`` checkpoint its stem (see `CheckpointedStemResNet`)."""
    if type(model) not in (tv.ResNet, CheckpointedStemResNet):
        raise InertiaError(
            f"checkpoint_stem supports torchvision's ResNet (and wide ResNets, ResNeXts), not "
            f"{type(model).__name__}; checkpoint another model's stem in its own forward with "
            "torch.utils.checkpoint."
        )
    model.__class__ = CheckpointedStemResNet
