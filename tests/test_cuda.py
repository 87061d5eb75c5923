"""The same guarantees on a GPU: parity, dropout replay, BatchNorm, autocast (skipped on CPU)."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch

from conftest import DTYPES, MLP, twins
from inertia import MomentumNet
from inertia.testing import assert_gradients_match, gradient_errors

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _no_tf32() -> Iterator[None]:
    # TF32 rounds matmul inputs to 10 bits: a reconstruction one ulp off then changes block outputs
    # by about 1e-3 (see the README). The float mode's parity is stated with TF32 off.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("dtype", DTYPES)
def test_parity_with_dropout_and_batchnorm(dtype: torch.dtype) -> None:
    net = MomentumNet([MLP(dropout=0.2, bn=True) for _ in range(8)], 0.9).to("cuda", dtype)
    backprop, free, _ = twins(net)
    x = torch.randn(32, 8, device="cuda", dtype=dtype, requires_grad=True)
    errors = assert_gradients_match(backprop, free, x, seed=5)
    assert errors["buffer.0.net.1.num_batches_tracked"] == 0.0


def test_cuda_generator_left_as_backprop_leaves_it() -> None:
    net = MomentumNet([MLP(dropout=0.5) for _ in range(4)], 0.9).cuda()
    backprop, free, _ = twins(net)
    x = torch.randn(16, 8, device="cuda", requires_grad=True)
    states = []
    for model in (backprop, free):
        torch.manual_seed(1)
        model(x).sum().backward()
        states.append(torch.cuda.get_rng_state())
    assert torch.equal(states[0], states[1])


def test_bf16_autocast() -> None:
    net = MomentumNet([MLP(32, 64) for _ in range(8)], 0.9).cuda()
    backprop, free, _ = twins(net)

    def loss(out: torch.Tensor) -> torch.Tensor:
        return out.float().square().sum()

    x = torch.randn(64, 32, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        errors = gradient_errors(backprop, free, x, loss_fn=loss)
    assert max(errors.values()) < 1e-2


@pytest.mark.parametrize("tf32", [False, True])
def test_exact_mode_matches_its_twin_even_with_tf32(tf32: bool) -> None:
    # TF32 is what makes float reconstruction drift on GPUs; exact mode rebuilds the forward's
    # inputs bit for bit, so it stays at the twin's gradients. 64 x 128 elements: compiled kernels.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    blocks = [MLP(d=64, h=128, bn=True) for _ in range(32)]
    net = MomentumNet(blocks, 0.5, use_backprop=False, exact=True, check_inversion="raise")
    net = net.cuda()
    twin = copy.deepcopy(net)
    twin.use_backprop = True
    x = torch.randn(128, 64, device="cuda", requires_grad=True)
    assert_gradients_match(twin, net, x, rtol=1e-5)
