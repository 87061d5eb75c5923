"""The core of inertia: the per-block chain of autograd nodes (`chain`), the arithmetics of the
momentum update (`arith`: float; `exact`: fixed point with a bit-exact inverse), their fused
kernels (`kernels`) and what a block's recomputation replays (`replay`).

Everything outside this package reaches the core through the names below.
"""

from .arith import Arithmetic, FloatArithmetic, State
from .chain import StackSpec, inverse, momentum_forward, records_autograd
from .exact import ExactArithmetic, ExactState, bits_per_element
from .replay import StatsOnce

__all__ = [
    "Arithmetic",
    "ExactArithmetic",
    "ExactState",
    "FloatArithmetic",
    "StackSpec",
    "State",
    "StatsOnce",
    "bits_per_element",
    "inverse",
    "momentum_forward",
    "records_autograd",
]
