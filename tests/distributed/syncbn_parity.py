"""Run by tests/test_distributed.py under torchrun on 2 GPUs (nccl): SyncBatchNorm in the blocks of
a memory-free MomentumNet, in float and in exact mode, under DistributedDataParallel.

SyncBatchNorm normalizes over the global batch, so each rank's gradients after DDP's all-reduce
must equal one process's on the whole batch with ordinary BatchNorm (float64, TF32 irrelevant). The
memory-free backward recomputes every block, SyncBatchNorm's all-reduce included, on every rank in
the same order, and restores the running statistics after the recomputation, so they too must match
one process's.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from inertia import MomentumNet
from inertia.testing import relative_error


def block() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16), nn.Tanh(),
                         nn.Linear(16, 8))  # fmt: skip


def main() -> None:
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    torch.manual_seed(0)
    blocks = [block() for _ in range(6)]
    batches = [torch.randn(8 * world, 8, dtype=torch.float64) for _ in range(3)]
    worst = 0.0
    for exact in (False, True):
        net = MomentumNet(blocks, 0.9, use_backprop=False, exact=exact).double()
        reference = copy.deepcopy(net).to(device)  # one process, ordinary BatchNorm
        reference.use_backprop = True
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(net)).to(device)
        ddp = DDP(synced, device_ids=[rank])
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
        for x in batches:
            x = x.to(device)
            opt.zero_grad()
            (ddp(x.chunk(world)[rank]).pow(2).sum() * world).backward()
            ref_opt.zero_grad()
            reference(x).pow(2).sum().backward()
            for p, q in zip(ddp.module.parameters(), reference.parameters(), strict=True):
                worst = max(worst, relative_error(p.grad, q.grad))
            for a, b in zip(ddp.module.buffers(), reference.buffers(), strict=True):
                worst = max(worst, relative_error(a.double(), b.double()))
            opt.step()
            ref_opt.step()
    dist.destroy_process_group()
    if rank == 0:
        print(f"worst relative error {worst:.1e}", flush=True)
    os._exit(0 if worst <= 1e-10 else 1)  # see ddp_parity.py


if __name__ == "__main__":
    main()
