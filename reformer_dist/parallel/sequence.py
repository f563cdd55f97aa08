"""Sequence parallelism for Reformer attention: DeepSpeed-Ulysses over heads, bucket sharding over the
sorted order (``parallel/bucket.py``), or both (2D: P = ulysses_size x bucket ranks).

The P ranks of a sequence-parallel group each hold L/P consecutive tokens for embeddings, feed-forward,
LM head and loss. Around each attention core, DeepSpeed's ``DistributedAttention`` all-to-alls
[B, L/P, H, D] -> [B, L, H/P, D], so every attention type (LSH, local, full) sees the whole sequence
for H/P heads; LSH rotations are drawn for all H heads and sliced, so a head hashes identically on
every rank and in the single-process run.

Gradients: each rank's loss is (its token-loss sum) / (token count of the whole sequence), so the sum
of the ranks' parameter gradients is the full-sequence gradient; ``scale_for_data_parallel`` undoes
DeepSpeed's average over the P ranks that share a sequence (the SP batch rule, ``parallel.config``).

``check_layout`` is the one place the layout rules that involve the model and the sequence length live;
the run config calls it once, before any process group starts (ParallelConfig checks U divides P).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from reformer_dist.config_schema import ConfigError
from reformer_dist.model.bucket_rules import full_attention_problem, piece_problem
from reformer_dist.model.config import ReformerConfig
from reformer_dist.model.context import AttentionContext
from reformer_dist.model.documents import document_ids, positions_in_document
from reformer_dist.parallel.bucket import BucketSharding
from reformer_dist.parallel.collectives import all_gather_cat
from reformer_dist.parallel.config import ParallelConfig, deepspeed_sequences, rank_layout


class UlyssesAttention:
    """``AttentionContext.sequence_parallel`` implementation over one process group."""

    bucket = None  # the sorted order is not sharded: every rank sees the whole sequence for its heads

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

    @property
    def ulysses_size(self) -> int:
        """All ranks of the group shard heads."""
        return self.size

    def attend(self, fn: Callable[..., Tensor], *tensors: Tensor, ctx: AttentionContext) -> Tensor:
        heads = tensors[0].shape[2]
        inner = dataclasses.replace(
            ctx, sequence_parallel=None, head_offset=ctx.head_offset + self.rank * (heads // self.size)
        )
        if len(tensors) == 2:  # shared-QK LSH: DistributedAttention moves (q, k, v); k is qk and unused
            qk, v = tensors

            def local(q: Tensor, k: Tensor, vv: Tensor) -> Tensor:  # k is q: shared QK
                return fn(q, vv, inner)

            args: tuple[Tensor, ...] = (qk, qk, v)
        else:

            def local(q: Tensor, k: Tensor, vv: Tensor) -> Tensor:
                return fn(q, k, vv, inner)

            args = tensors
        layer = self._dist_attn_cls(local, self.group, scatter_idx=2, gather_idx=1)
        return layer(*args, 0)


class SequenceParallel:
    """The attention layout of one sequence-parallel group of P = U x K ranks (``AttentionContext.sequence_parallel``).

    Ranks are laid out k*U + u: the U ranks of a Ulysses group are consecutive and together hold L/K
    consecutive tokens; the K ranks with the same u hold the same heads after Ulysses' all-to-all and
    form a bucket group over the whole sequence. U = P is pure Ulysses (today's default), U = 1 pure
    bucket sharding.
    """

    def __init__(
        self, group: dist.ProcessGroup, ulysses_group: dist.ProcessGroup | None, bucket_group: dist.ProcessGroup | None
    ):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.ulysses = (
            UlyssesAttention(ulysses_group)
            if ulysses_group is not None and dist.get_world_size(ulysses_group) > 1
            else None
        )
        self.bucket = (
            BucketSharding(bucket_group) if bucket_group is not None and dist.get_world_size(bucket_group) > 1 else None
        )

    @property
    def ulysses_size(self) -> int:
        return 1 if self.ulysses is None else self.ulysses.size

    def attend(self, fn: Callable[..., Tensor], *tensors: Tensor, ctx: AttentionContext) -> Tensor:
        inner = dataclasses.replace(ctx, sequence_parallel=None, bucket=self.bucket)
        if self.ulysses is None:
            return fn(*tensors, inner)
        return self.ulysses.attend(fn, *tensors, ctx=inner)


def check_layout(cfg: ReformerConfig, length: int, parallel: ParallelConfig) -> None:
    """The one place the sequence-parallel layout rules live: ConfigError naming the keys when the model
    cannot run sequences of `length` tokens in this layout."""
    sp_size, ulysses_size = parallel.sequence_parallel_size, parallel.heads_group_size
    if cfg.n_heads % ulysses_size:
        raise ConfigError(
            f"parallel.ulysses_size={ulysses_size} must divide model.n_heads={cfg.n_heads} (Ulysses "
            f"shards heads; leave parallel.ulysses_size unset for the largest size that divides both "
            f"model.n_heads and parallel.sequence_parallel_size={sp_size})"
        )
    try:
        cfg.head_groups_for(length, ulysses_size)
    except ValueError as e:
        raise ConfigError(f"model.{e} (parallel.ulysses_size={ulysses_size})") from None
    mult = cfg.pad_multiple()
    if length % sp_size or length % mult:
        raise ConfigError(
            f"data.seq_len={length} must be a multiple of parallel.sequence_parallel_size={sp_size} "
            f"and of the chunk length(s) {mult} (no internal padding under sequence parallelism)"
        )
    k = sp_size // ulysses_size
    if k == 1:
        return
    per = length // k  # tokens of one bucket rank
    problem = full_attention_problem(cfg.attn_layers)
    if problem:
        raise ConfigError(
            f"{problem} (parallel.sequence_parallel_size={sp_size}, parallel.ulysses_size={ulysses_size})"
        )
    if "lsh" in cfg.attn_layers:
        problem = piece_problem(
            "lsh",
            per,
            k,
            chunk_len=cfg.chunk_len,
            n_chunks_before=cfg.n_chunks_before,
            n_chunks_after=cfg.n_chunks_after,
            n_hashes=cfg.n_hashes,
        )
        if problem:
            raise ConfigError(f"data.seq_len={length}: {problem}")
    if "local" in cfg.attn_layers:
        problem = piece_problem(
            "local",
            per,
            k,
            chunk_len=cfg.local_chunk,
            n_chunks_before=cfg.local_n_chunks_before,
            n_chunks_after=cfg.local_n_chunks_after,
        )
        if problem:
            raise ConfigError(f"data.seq_len={length}: {problem}")


def document_inputs(
    ids: Tensor, eod_id: int, reset_positions: bool, sp: "SequenceParallel | None" = None, sp_rank: int = 0
) -> dict[str, Tensor]:
    """The model's document inputs for this rank's tokens `ids`: ``document_ids`` of the whole window
    (attention sees all of it: the SP ranks hold consecutive slices of one window, gathered here) and,
    with `reset_positions`, this rank's slice of ``positions``."""
    window = ids if sp is None else all_gather_cat(ids, sp.group, sp.size, dim=1)
    docs = document_ids(window, eod_id)
    out = {"document_ids": docs}
    if reset_positions:
        n = ids.shape[1]
        out["positions"] = positions_in_document(docs)[:, sp_rank * n : (sp_rank + 1) * n]
    return out


def sequence_parallel_loss(
    model: Callable[..., Any],
    input_ids: Tensor,
    labels: Tensor,
    *,
    position_offset: int,
    sp: "SequenceParallel | UlyssesAttention",
    hash_seed: int | None = None,
    scale_for_data_parallel: bool = False,
    **model_kwargs,
) -> tuple[Tensor, Tensor]:
    """(loss to backpropagate, mean loss of the whole sequence for logging) on one SP rank.

    The backward loss is local_sum / global_count: summed over the group's ranks it is the full
    sequence's mean, so summing gradients over the group gives the single-process gradient.
    """
    total, count = model(
        input_ids,
        labels,
        position_offset=position_offset,
        hash_seed=hash_seed,
        reduction="sum",
        sequence_parallel=sp,
        **model_kwargs,
    )
    stats = torch.stack([total.detach().to(torch.float64), count.to(torch.float64)])
    dist.all_reduce(stats, group=sp.group)
    loss = total / stats[1].clamp(min=1).to(total.dtype)
    if scale_for_data_parallel:  # DeepSpeed averages over the sp.size ranks of this sequence: undo it
        loss = loss * deepspeed_sequences(1, sp.size)
    return loss, (stats[0] / stats[1].clamp(min=1)).to(torch.float32)


def new_sequence_parallel(sp_size: int, ulysses_size: int | None = None) -> tuple[SequenceParallel, int, int, int]:
    """Groups of one P = U x K layout (every rank must call this; U defaults to P, pure Ulysses).

    Returns (this rank's SequenceParallel, sp_rank, dp_rank, dp_size). The world splits into consecutive
    SP groups of P ranks; within each, Ulysses groups are consecutive blocks of U ranks and bucket groups
    take one rank of each block. The sizes are checked by ParallelConfig (U divides P, P divides the world).
    """
    layout = ParallelConfig(sequence_parallel_size=sp_size, ulysses_size=ulysses_size)
    world, rank = dist.get_world_size(), dist.get_rank()
    dp_size = layout.data_parallel_size(world)
    u = layout.heads_group_size
    sp_group = ulysses = bucket = None
    for start in range(0, world, sp_size):  # every rank creates every group, in the same order
        g = dist.new_group(list(range(start, start + sp_size)))
        if start <= rank < start + sp_size:
            sp_group = g
    for start in range(0, world, sp_size):
        for k in range(sp_size // u):
            ranks = list(range(start + k * u, start + (k + 1) * u))
            g = dist.new_group(ranks)
            if rank in ranks:
                ulysses = g
        for j in range(u):
            ranks = list(range(start + j, start + sp_size, u))
            g = dist.new_group(ranks)
            if rank in ranks:
                bucket = g
    if sp_group is None:  # unreachable: the loop covers every rank of the world
        raise RuntimeError(f"rank {rank} is in no sequence-parallel group of {sp_size} ranks (world {world})")
    dp_rank, sp_rank = rank_layout(rank, sp_size)
    return SequenceParallel(sp_group, ulysses, bucket), sp_rank, dp_rank, dp_size
