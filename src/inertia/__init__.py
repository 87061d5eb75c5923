"""inertia: Momentum Residual Networks for PyTorch, trainable with memory constant in depth.

Sander, Ablin, Blondel and Peyré, "Momentum Residual Neural Networks", ICML 2021.
"""

from . import _hf_auto
from ._choose import GammaChoice, choose_gamma
from ._core import ExactState, Word
from ._errors import InertiaError, InversionError, InversionWarning
from ._layerlist import MomentumLayerList
from .loss import causal_lm_loss, use_chunked_loss
from .models import create_model, list_models, register_model
from .nn import MomentumNet, from_momentumnet_state_dict
from .plan import Plan, StackPlan, plan_stack
from .transform import find_residual_stacks, from_pretrained, transform_to_momentumnet

__version__ = "0.1.0.dev0"

_hf_auto.install()  # HuggingFace's Auto classes load converted models' saves, once imported

__all__ = [
    "ExactState",
    "GammaChoice",
    "InertiaError",
    "InversionError",
    "InversionWarning",
    "MomentumLayerList",
    "MomentumNet",
    "Plan",
    "StackPlan",
    "Word",
    "__version__",
    "causal_lm_loss",
    "choose_gamma",
    "create_model",
    "find_residual_stacks",
    "from_momentumnet_state_dict",
    "from_pretrained",
    "list_models",
    "plan_stack",
    "register_model",
    "transform_to_momentumnet",
    "use_chunked_loss",
]
