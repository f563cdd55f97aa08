"""Sequence parallelism (DeepSpeed-Ulysses) for Reformer attention.

The P ranks of a sequence-parallel group each hold L/P consecutive tokens for embeddings, feed-forward,
LM head and loss. Around each attention core, DeepSpeed's ``DistributedAttention`` all-to-alls
[B, L/P, H, D] -> [B, L, H/P, D], so every attention type (LSH, local, full) sees the whole sequence
for H/P heads; LSH rotations are drawn for all H heads and sliced, so a head hashes identically on
every rank and in the single-process run.

Gradients: each rank's loss is (its token-loss sum) / (token count of the whole sequence), so the sum
of the ranks' parameter gradients is the full-sequence gradient; ``scale_for_data_parallel`` multiplies
by P when the optimizer averages gradients over all SP x DP ranks (DeepSpeed without an mpu does).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from reformer_dist.model.config import ReformerConfig
from reformer_dist.model.context import AttentionContext


class UlyssesAttention:
    """``AttentionContext.sequence_parallel`` implementation over one process group."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        import deepspeed  # deferred: only SP runs need deepspeed
        import deepspeed.comm as ds_comm
        from deepspeed.sequence.layer import DistributedAttention

        if not ds_comm.is_initialized():  # DistributedAttention talks through deepspeed.comm
            deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        self._dist_attn_cls = DistributedAttention
        self.group = group if group is not None else dist.group.WORLD
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)

    def check(self, cfg: ReformerConfig, local_len: int) -> None:
        """Raise ValueError when heads or length do not divide across the group."""
        if cfg.n_heads % self.size:
            raise ValueError(f"sequence_parallel_size={self.size} must divide model.n_heads={cfg.n_heads}")
        total = local_len * self.size
        mult = cfg.pad_multiple()
        if total % mult:
            raise ValueError(f"sequence length {total} (= {local_len} per rank x {self.size}) must be a multiple "
                             f"of the chunk length(s) {mult} under sequence parallelism")

    def attend(self, fn: Callable[..., Tensor], *tensors: Tensor, ctx: AttentionContext) -> Tensor:
        heads = tensors[0].shape[2]
        inner = dataclasses.replace(ctx, sequence_parallel=None,
                                    head_offset=ctx.head_offset + self.rank * (heads // self.size))
        if len(tensors) == 2:  # shared-QK LSH: DistributedAttention moves (q, k, v); k is qk and unused
            qk, v = tensors

            def local(q: Tensor, _k: Tensor, vv: Tensor) -> Tensor:
                return fn(q, vv, inner)

            args = (qk, qk, v)
        else:
            def local(q: Tensor, k: Tensor, vv: Tensor) -> Tensor:
                return fn(q, k, vv, inner)

            args = tensors
        layer = self._dist_attn_cls(local, self.group, scatter_idx=2, gather_idx=1)
        return layer(*args, 0)


def sequence_parallel_loss(model: torch.nn.Module, input_ids: Tensor, labels: Tensor, *, position_offset: int,
                           sp: UlyssesAttention, hash_seed: int | None = None,
                           scale_for_data_parallel: bool = False) -> tuple[Tensor, Tensor]:
    """(loss to backpropagate, mean loss of the whole sequence for logging) on one SP rank.

    The backward loss is local_sum / global_count: summed over the group's ranks it is the full
    sequence's mean, so summing gradients over the group gives the single-process gradient.
    """
    total, count = model(input_ids, labels, position_offset=position_offset, hash_seed=hash_seed,
                         reduction="sum", sequence_parallel=sp)
    stats = torch.stack([total.detach().to(torch.float64), count.to(torch.float64)])
    dist.all_reduce(stats, group=sp.group)
    loss = total / stats[1].clamp(min=1).to(total.dtype)
    if scale_for_data_parallel:
        loss = loss * sp.size
    return loss, (stats[0] / stats[1].clamp(min=1)).to(torch.float32)


def new_sequence_parallel_groups(sp_size: int) -> tuple[dist.ProcessGroup, int, int, int]:
    """Split the world into consecutive groups of ``sp_size`` ranks (every rank must call this).

    Returns (this rank's SP group, sp_rank, dp_rank, dp_size).
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % sp_size:
        raise ValueError(f"parallel.sequence_parallel_size={sp_size} must divide the world size {world}")
    mine = None
    for start in range(0, world, sp_size):
        g = dist.new_group(list(range(start, start + sp_size)))
        if start <= rank < start + sp_size:
            mine = g
    return mine, rank % sp_size, rank // sp_size, world // sp_size
