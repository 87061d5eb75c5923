"""Run by tests/test_distributed.py under torchrun: FSDP2 (fully_shard) and a memory-free stack.

fully_shard on the whole model: gradients equal one process's on the whole batch. fully_shard on
each block: a clear error, before any wrong gradient.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from inertia import InertiaError, MomentumNet
from inertia.testing import relative_error


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8)) for _ in range(4)]
    base = MomentumNet(blocks, 0.9, use_backprop=False).double()
    x = torch.randn(4 * world, 8, dtype=torch.float64)
    reference = copy.deepcopy(base)
    reference.use_backprop = True
    reference(x).pow(2).sum().backward()
    model = fully_shard(copy.deepcopy(base))
    (model(x.chunk(world)[rank]).pow(2).sum() * world).backward()
    worst = max(
        relative_error(p.grad.full_tensor(), q.grad)
        for p, q in zip(model.parameters(), reference.parameters(), strict=True)
    )
    per_block = copy.deepcopy(base)
    for block in per_block:
        fully_shard(block)
    try:
        per_block(x.chunk(world)[rank])
        refused = False
    except InertiaError as err:
        refused = "Apply fully_shard to the MomentumNet" in str(err)
    dist.destroy_process_group()
    if rank == 0:
        print(
            f"whole model: worst relative gradient error {worst:.1e}; per block refused: {refused}",
            flush=True,
        )
    os._exit(0 if worst <= 1e-10 and refused else 1)  # as in ddp_parity.py: no teardown abort


if __name__ == "__main__":
    main()
