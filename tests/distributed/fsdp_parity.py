"""Run by tests/test_distributed.py under torchrun: FSDP2 (fully_shard) and a memory-free stack.

Each rank trains on its half of the batch for three SGD steps; the gradients must equal one
process's on the whole batch (float64), in float and in exact mode, for each wrapping:
``fully_shard`` on the whole model; on each block and then on the model (the usual wrapping); on
each block alone (the layers around the stack are then plain, and their gradients are all-reduced
by hand); and on a submodule inside each block, next to a parameter FSDP does not manage. With
FSDP's bf16 mixed precision (one step), memory-free gradients must be as close to float32
training's as backprop's are, within 2x, and equal backprop's bit for bit in exact mode. A
memory-free step makes as many all-gathers and reduce-scatters as a backprop step. A converted
torchvision ResNet-18 (BatchNorm in train mode), sharded as the README shows, matches its backprop
twin: gradients and running statistics. Blocks that FSDP shards count as communicating, so exact
mode gives them no int32 words (whose overflow would rerun a forward on one rank alone).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.fsdp._fully_shard._fsdp_param_group as fsdp_group  # to count collectives
from torch import Tensor, nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from inertia import MomentumNet, transform_to_momentumnet
from inertia._core import communicates
from inertia.testing import backprop_twin, relative_error


def model(exact: bool, use_backprop: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    blocks = [
        nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8), nn.LayerNorm(8))
        for _ in range(4)
    ]
    stack = MomentumNet(blocks, 0.9, use_backprop=use_backprop, exact=exact)
    return nn.Sequential(nn.Linear(8, 8), stack, nn.Linear(8, 3))


def blocks(net: nn.Module) -> list[nn.Module]:
    """The blocks of every memory-free stack in ``net``."""
    return [block for m in net.modules() if isinstance(m, MomentumNet) for block in m]


def whole(net: nn.Module) -> None:
    fully_shard(net)


def each_block(net: nn.Module, **options: Any) -> None:
    for block in blocks(net):
        fully_shard(block, **options)


def each_block_then_model(net: nn.Module, **options: Any) -> None:
    """The README's recipe."""
    each_block(net, **options)
    fully_shard(net, **options)


def inside_each_block(net: nn.Module) -> None:
    for block in blocks(net):
        fully_shard(block[0])  # block[2] and the LayerNorm stay plain: FSDP does not manage them


def watch_communication(net: nn.Module) -> list[bool]:
    """What `communicates` says of the stack's blocks, at each of its forwards."""
    seen: list[bool] = []
    stack = next(m for m in net.modules() if isinstance(m, MomentumNet))
    stack.register_forward_pre_hook(lambda m, _: seen.append(communicates(list(m))))
    return seen


def full(grad: Tensor, world: int) -> Tensor:
    """A parameter's gradient on the whole batch. FSDP averages the sharded ones over ranks; the
    others are averaged here, in place, so that the optimizer steps with them too."""
    if hasattr(grad, "full_tensor"):
        return grad.full_tensor()
    if world > 1:
        dist.all_reduce(grad)
        grad /= world
    return grad.clone()


def train(net: nn.Module, batches: list[Tensor], world: int, rank: int) -> list[list[Tensor]]:
    """Three SGD steps on this rank's shard; each step's gradients on the whole batch."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    grads = []
    for x in batches:
        opt.zero_grad()
        (net(x.chunk(world)[rank]).pow(2).sum() * world).backward()
        grads.append([full(p.grad, world) for p in net.parameters()])
        opt.step()
    return grads


def worst(grads: list[list[Tensor]], reference: list[list[Tensor]]) -> float:
    return max(
        relative_error(g, r)
        for step, ref_step in zip(grads, reference, strict=True)
        for g, r in zip(step, ref_step, strict=True)
    )


def overall(grads: list[Tensor], reference: list[Tensor]) -> float:
    """Relative error of all the parameters' gradients as one vector."""
    return relative_error(
        torch.cat([g.flatten() for g in grads]), torch.cat([r.flatten() for r in reference])
    )


def collectives_per_step(use_backprop: bool) -> tuple[int, int]:
    """All-gathers and reduce-scatters of one training step, each block sharded, then the model.

    Counted at FSDP2's private entry points (the names of torch 2.11 to 2.14).
    """
    counts = [0, 0]
    gather, reduce = fsdp_group.foreach_all_gather, fsdp_group.foreach_reduce

    def counted(i: int, fn: Callable[..., object]) -> Callable[..., object]:
        def wrapper(*args: object, **kwargs: object) -> object:
            counts[i] += 1
            return fn(*args, **kwargs)

        return wrapper

    net = model(False, use_backprop).double()
    each_block_then_model(net)
    net(torch.randn(2, 8, dtype=torch.float64)).sum().backward()  # the first step initializes
    fsdp_group.foreach_all_gather = counted(0, gather)
    fsdp_group.foreach_reduce = counted(1, reduce)
    try:
        net(torch.randn(2, 8, dtype=torch.float64)).sum().backward()
    finally:
        fsdp_group.foreach_all_gather, fsdp_group.foreach_reduce = gather, reduce
    return counts[0], counts[1]


def converted_resnet(rank: int, world: int) -> tuple[float, float]:
    """A torchvision ResNet-18, converted memory-free, each block sharded and then the model (the
    README's recipe), one training step in train mode (BatchNorm on each rank's batch): the
    gradients and the BatchNorm buffers equal those of its backprop twin (exact arithmetic, the
    memory-free default, pinned), sharded alike."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    base = transform_to_momentumnet(resnet18(num_classes=10), gamma=0.9, method="memory_free")
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64) + rank
    grads, buffers = [], []
    for net in (backprop_twin(base).double(), copy.deepcopy(base).double()):
        each_block_then_model(net)
        net(x).square().sum().backward()
        grads.append([full(p.grad, world) for p in net.parameters()])
        buffers.append([b.double() for b in net.buffers()])
    return worst([grads[1]], [grads[0]]), worst([buffers[1]], [buffers[0]])


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1)  # the same batches on every rank
    batches = [torch.randn(4 * world, 8, dtype=torch.float64) for _ in range(3)]
    lines = []
    ok = True
    for exact in (False, True):
        reference = train(model(exact, use_backprop=True).double(), batches, 1, 0)
        for wrap in (whole, each_block_then_model, each_block, inside_each_block):
            net = model(exact).double()
            wrap(net)
            # Blocks that all-gather in their forward cannot rerun it on one rank: no int32 words.
            # (Sharded on the whole model only, they see plain parameters during the forward.)
            seen = watch_communication(net)
            error = worst(train(net, batches, world, rank), reference)
            ok = ok and error <= 1e-10 and set(seen) == {wrap is not whole}
            lines.append(f"{wrap.__name__} exact={exact}: {error:.1e}")
        # FSDP's bf16 mixed precision, one step from the same float32 weights: memory-free gradients
        # are as close to float32 training's as backprop's are (bf16 noise, about 1e-2), and in
        # exact mode they equal backprop's bit for bit.
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        runs = {}
        for name, use_backprop, mp in (("fp32", True, None), ("bf16 backprop", True, policy),
                                       ("bf16 memory-free", False, policy)):  # fmt: skip
            net = model(exact, use_backprop)
            each_block_then_model(net, mp_policy=mp or MixedPrecisionPolicy())
            (runs[name],) = train(net, [batches[0].float()], world, rank)
        backprop = overall(runs["bf16 backprop"], runs["fp32"])
        free = overall(runs["bf16 memory-free"], runs["fp32"])
        twins = overall(runs["bf16 memory-free"], runs["bf16 backprop"])
        ok = ok and (twins == 0.0 if exact else free <= 2 * backprop)
        lines.append(
            f"bf16 mixed precision exact={exact}: from float32, backprop {backprop:.1e}, "
            f"memory-free {free:.1e}; between them {twins:.1e}"
        )
    grad_error, buffer_error = converted_resnet(rank, world)
    ok = ok and grad_error <= 1e-10 and buffer_error == 0.0
    lines.append(
        f"converted ResNet-18, each block then the model: gradients {grad_error:.1e}, "
        f"BatchNorm buffers {buffer_error:.1e} against backprop"
    )
    counts = {use_backprop: collectives_per_step(use_backprop) for use_backprop in (True, False)}
    ok = ok and counts[False] == counts[True]
    lines.append(f"all-gathers, reduce-scatters per step: backprop {counts[True]}, "
                 f"memory-free {counts[False]}")  # fmt: skip
    dist.destroy_process_group()
    if rank == 0:
        print("\n".join(lines), flush=True)
        print(f"fully_shard parity: {'ok' if ok else 'FAILED'}", flush=True)
    os._exit(0 if ok else 1)  # as in ddp_parity.py: no teardown abort


if __name__ == "__main__":
    main()
