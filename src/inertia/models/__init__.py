"""A registry of momentum models, as in timm: `create_model`, `list_models`, `register_model`.

The built-in models, momentum ResNet-18 to 152 with ImageNet and CIFAR stems, live in
`inertia.models.resnet`, which needs torchvision (``pip install 'inertia[vision]'``); it is imported
on the registry's first use, so ``import inertia`` does not import torchvision.
"""

from ._registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
