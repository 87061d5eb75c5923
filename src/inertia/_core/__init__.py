"""The core of inertia: the per-block chain of autograd nodes (`chain`), the arithmetics of the
momentum update (`arith`: float; `exact`: fixed point with a bit-exact inverse), their fused
kernels (`kernels`) and what a block's recomputation replays (`replay`).

Everything outside this package reaches the core through the names below.
"""

from .arith import Arithmetic, FloatArithmetic, State
from .chain import StackSpec, communicates, inverse, momentum_forward, records_autograd
from .exact import (
    ExactArithmetic,
    ExactState,
    Word,
    bits_per_element,
    kept_bytes_per_element,
)
from .replay import StatsOnce, checkpointed_call

__all__ = [
    "Arithmetic",
    "ExactArithmetic",
    "ExactState",
    "FloatArithmetic",
    "StackSpec",
    "State",
    "StatsOnce",
    "Word",
    "bits_per_element",
    "checkpointed_call",
    "communicates",
    "inverse",
    "kept_bytes_per_element",
    "momentum_forward",
    "records_autograd",
]
