"""Batch-coupled measures under `torch.distributed`: compute them on the local or on the global batch.

HSIC, CKA and the batch-scope Gram compare samples with each other, so their value on a rank's local batch
is not their value on the global batch. `gather="global"` concatenates every rank's batch (ranks may hold
different batch sizes) through a differentiable all-gather. Its backward pass sums, over ranks, the
gradient with respect to each rank's slice: every rank computes the same global loss, so a rank receives
`world_size × ∂L/∂x_local`, and after `DistributedDataParallel` averages parameter gradients over ranks they
equal the single-process gradients on the concatenated batch.

Sums over ranks come in two kinds, one function each: `sum_across_ranks` (differentiable, and only under
`gather="global"`: what a loss's feature-space estimate adds across ranks) and `sum_across_ranks_detached` (no
gradient, always over every rank: the statistics a module keeps identical on every rank).
"""

from __future__ import annotations

from typing import Any, Literal, TypeAlias

import torch
import torch.distributed as dist
from torch import Tensor

Gather: TypeAlias = Literal["local", "global"]
GATHERS: tuple[Gather, ...] = ("local", "global")


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_batch(x: Tensor, gather: Gather = "local") -> Tensor:
    """`x` itself (`"local"`, or no process group), or every rank's `x` concatenated along dim 0 in rank order.

    Differentiable for floating-point `x`; integer tensors (labels) are gathered without gradient.
    """
    if gather not in GATHERS:
        raise ValueError(f"'gather' must be one of 'local', 'global'; got {gather!r}")
    if gather == "local" or not is_distributed():
        return x
    gathered: Tensor = _AllGatherBatch.apply(x)  # type: ignore[no-untyped-call]
    return gathered


def gather_labels(labels: Tensor, gather: Gather = "local") -> tuple[Tensor, int]:
    """Every rank's integer `labels` concatenated along dim 0 in rank order (no gradient), and the row where this
    rank's own labels start in it; `(labels, 0)` under `"local"` or without a process group.

    What a feature-space estimate over groups of samples needs under `gather="global"`: every rank numbers the
    groups (task classes) alike from the labels of all ranks, then all-reduces its sums per group; the labels
    travel (one integer a sample), the features do not.
    """
    if gather not in GATHERS:
        raise ValueError(f"'gather' must be one of 'local', 'global'; got {gather!r}")
    if gather == "local" or not is_distributed():
        return labels, 0
    gathered, counts = _all_gather_padded(labels.detach())
    return gathered, sum(counts[: dist.get_rank()])


def _all_gather_padded(x: Tensor) -> tuple[Tensor, list[int]]:
    """Every rank's `x` concatenated (dim 0), and the ranks' batch sizes."""
    world = dist.get_world_size()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)]), counts


class _AllGatherBatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        gathered, counts = _all_gather_padded(x)
        rank = dist.get_rank()
        ctx.start, ctx.stop = sum(counts[:rank]), sum(counts[: rank + 1])
        return gathered

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.stop]


def sum_across_ranks_detached(x: Tensor) -> Tensor:
    """`x` summed over every rank, as a new tensor without gradient history; `x` itself without a process group
    of several ranks. The non-differentiable twin of `sum_across_ranks`, for values that carry no gradient: the
    statistics a module keeps (`Purify`'s class sums, the adversary's own head steps).

    Every rank must call it at the same point with a tensor of the same shape and dtype (a collective): the
    modules that keep state call it on every training call, whatever the batch holds, so no rank waits alone.
    """
    if not is_distributed():
        return x
    return _summed_copy(x)


def _summed_copy(x: Tensor) -> Tensor:
    """A detached, contiguous copy of `x` summed over every rank (one all-reduce)."""
    total = x.detach().clone().contiguous()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def average_gradients_across_ranks(tensors: list[Tensor]) -> list[Tensor]:
    """The tensors themselves (views) whose gradients are averaged over ranks in the backward pass.

    For parameters that a `DistributedDataParallel` wrapper does not reach (a loss module's own head): after
    `backward()` each rank holds the mean of the ranks' gradients, as DDP would give, so one optimizer step keeps
    the ranks' copies equal. The tensors' gradients travel in one all-reduce. Without a process group of
    several ranks, `tensors` is returned as it is.
    """
    if not is_distributed() or not tensors:
        return tensors
    averaged: tuple[Tensor, ...] = _AverageGradients.apply(*tensors)  # type: ignore[no-untyped-call]
    return list(averaged)


class _AverageGradients(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor, ...]:
        dtype = grads[0].dtype
        for g in grads[1:]:
            dtype = torch.promote_types(dtype, g.dtype)
        flat = torch.cat([g.reshape(-1).to(dtype) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat = flat / dist.get_world_size()
        parts = torch.split(flat, [g.numel() for g in grads])
        return tuple(part.reshape(g.shape).to(g.dtype) for part, g in zip(parts, grads, strict=True))


def sum_across_ranks(x: Tensor, gather: Gather = "local") -> Tensor:
    """`x` itself (`"local"`, or no process group of several ranks), or `x` summed over every rank, differentiable
    (`sum_across_ranks_detached` is the twin without gradient, for a module's statistics).

    What a feature-space estimate needs of the global batch: its sums (`XᵀY`, `Xᵀ1`, ...) add across ranks, so
    they travel instead of the batch, at a cost that does not grow with the batch or the world size. Every
    rank must call it at the same point with a tensor of the same shape and dtype (a collective). Its backward
    pass sums the ranks' gradients, as `gather_batch`'s does: every rank computes the same global loss, so a rank
    receives `world_size × ∂L/∂x_local`, and after `DistributedDataParallel` averages parameter gradients over
    ranks they equal the single-process gradients on the concatenated batch.
    """
    if gather not in GATHERS:
        raise ValueError(f"'gather' must be one of 'local', 'global'; got {gather!r}")
    if gather == "local" or not is_distributed():
        return x
    summed: Tensor = _AllReduceSum.apply(x)  # type: ignore[no-untyped-call]
    return summed


def max_across_ranks(x: Tensor, gather: Gather = "local") -> Tensor:
    """`x` itself (`"local"`, or no process group of several ranks), or its elementwise maximum over every rank,
    detached (for scales and rounding floors, which carry no gradient). A collective, as `sum_across_ranks`."""
    if gather not in GATHERS:
        raise ValueError(f"'gather' must be one of 'local', 'global'; got {gather!r}")
    if gather == "local" or not is_distributed():
        return x.detach()
    largest = x.detach().clone().contiguous()
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return largest


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return _summed_copy(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return _summed_copy(grad)
