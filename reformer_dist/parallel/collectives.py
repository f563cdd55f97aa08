"""The small collectives the trainer and its helpers use, each a no-op (or the local answer) without a
process group, so the same code serves one process and many.

Host values (a loss sum, a stop flag, a histogram) live in CPU tensors, but NCCL only reduces device
tensors: under NCCL they make a round trip through the current CUDA device (`all_reduce_host`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _active(group: Any = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce_host(t: torch.Tensor, op: Any = dist.ReduceOp.SUM, group: Any = None) -> torch.Tensor:
    """Reduce a small host tensor over the ranks of `group`, in place (and return it)."""
    if not _active(group):
        return t
    if "nccl" in str(dist.get_backend(group)):
        x = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(x, op=op, group=group)
        t.copy_(x.cpu())
    else:
        dist.all_reduce(t, op=op, group=group)
    return t


def any_rank(flag: bool, group: Any = None) -> bool:
    """Whether `flag` is true on any rank: the same answer everywhere (a collective: every rank calls it)."""
    return bool(all_reduce_host(torch.tensor([int(flag)], dtype=torch.int32), dist.ReduceOp.MAX, group).item())


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (any picklable value, e.g. an answer or an exception)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_cat(t: torch.Tensor, group: Any, size: int, dim: int) -> torch.Tensor:
    """The `size` ranks' tensors of `group` (same shape), concatenated along `dim` in rank order."""
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)
