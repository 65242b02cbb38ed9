"""Data parallelism for training: one process per device under `torchrun`.

Every rank builds the same epoch plan and trains on its slice of each global
batch. Embeddings are all-gathered so every query sees every rank's keys as
in-batch negatives; the gathered copy of a rank's own embeddings is replaced by
the tensor with gradients, so each rank back-propagates the global loss into
its own shard only. Summing the ranks' gradients (all-reduce) then gives
exactly the gradient of the global loss, as one process over the whole batch
would (FlagEmbedding and LLM-Embedder gather the same way). Works with NCCL on
GPUs and gloo on CPUs.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None) -> Distributed:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Distributed(rank, world, local_rank)


def close_distributed(ctx: Distributed) -> None:
    """Leave the process group once every rank is done: a rank that exits with gloo's threads still running can
    abort ("terminate called without an active exception")."""
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_distributed(device: str | None, body: Callable[[Distributed], T]) -> T:
    """`body(ctx)` inside the process group of a `torchrun` launch (a plain process otherwise), left once
    every rank is done, whatever happened."""
    ctx = init_distributed(device)
    try:
        return body(ctx)
    finally:
        close_distributed(ctx)


def gather_with_local_grad(tensor: torch.Tensor, ctx: Distributed) -> torch.Tensor:
    """Concatenate every rank's `tensor` (same shape on all) in rank order; only the local part has gradients."""
    if not ctx.enabled:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(ctx.world_size)]
    dist.all_gather(parts, tensor.detach().contiguous())
    parts[ctx.rank] = tensor
    return torch.cat(parts, dim=0)


def sum_gradients(parameters, ctx: Distributed) -> None:
    """All-reduce (sum) the gradients of `parameters` in one flat buffer."""
    if not ctx.enabled:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def sum_over_ranks(value: torch.Tensor, ctx: Distributed) -> torch.Tensor:
    """The sum of every rank's `value` (a detached copy; the value itself in a single process)."""
    if not ctx.enabled:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def same_on_every_rank(value: int, ctx: Distributed, device: torch.device) -> bool:
    """Whether every rank holds the same integer (one all-reduce of its maximum and minimum)."""
    if not ctx.enabled:
        return True
    bounds = torch.tensor([value, -value], dtype=torch.int64, device=device)
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
    return int(bounds[0]) == -int(bounds[1])


def broadcast_object(obj, ctx: Distributed):
    """Rank 0's Python object on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: Distributed) -> None:
    if ctx.enabled:
        dist.barrier()
