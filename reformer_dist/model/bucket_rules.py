"""What bucket sharding (``parallel/bucket.py``: ranks holding slices of one sequence and sharding LSH's sorted
order) can run: three rules, each one function or constant with one message.

The run config checks them once, before any process group starts (``parallel.sequence.check_layout``,
``training.config``); the model and ``BucketSharding`` check them again where a direct caller meets them, with
the same message. They live in model/ because the model needs two of them and never imports parallel/.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

BUCKET_SHARDING = "bucket sharding (parallel.ulysses_size < parallel.sequence_parallel_size)"

# document masks: each LSH round would have to be sorted by (document, bucket) across ranks, which the sharded
# sort does not do; callers prefix the key or argument that asked for them (data.document_masking, document_ids)
DOCUMENT_MASKS_REFUSED = f"not supported with {BUCKET_SHARDING}; use pure Ulysses"


def full_attention_problem(attn_layers: Sequence[str]) -> str | None:
    """Why these layers cannot run under bucket sharding (a 'full' layer needs the whole sequence on one rank),
    naming the first such layer; None when all of them can."""
    for i, kind in enumerate(attn_layers):
        if kind == "full":
            return (
                f"model.attn_layers[{i}] = 'full' needs the whole sequence: it cannot run with {BUCKET_SHARDING}; "
                f"use 'lsh'/'local' layers or parallel.ulysses_size = parallel.sequence_parallel_size"
            )
    return None


def piece_problem(
    kind: Literal["lsh", "local"],
    tokens_per_rank: int,
    ranks: int,
    *,
    chunk_len: int,
    n_chunks_before: int,
    n_chunks_after: int,
    n_hashes: int = 1,
) -> str | None:
    """Why a bucket rank's piece cannot hold whole chunks and its neighbours' look-around; None when it can.

    An LSH layer's rank owns ``n_hashes x tokens_per_rank`` slots of the sorted order, a local layer's rank
    ``tokens_per_rank`` tokens; either must be a multiple of the chunk length and hold at least
    max(n_chunks_before, n_chunks_after, 1) chunks (the halo comes from one neighbour on each side).
    """
    rows = n_hashes * tokens_per_rank if kind == "lsh" else tokens_per_rank
    least = max(n_chunks_before, n_chunks_after, 1)
    if rows % chunk_len == 0 and rows // chunk_len >= least:
        return None
    if kind == "lsh":
        return (
            f"each of the {ranks} bucket ranks owns n_hashes x seq_len / {ranks} = {n_hashes} x {tokens_per_rank} "
            f"= {rows} sorted slots, which must be a multiple of model.chunk_len={chunk_len} and hold "
            f"max(model.n_chunks_before, model.n_chunks_after, 1) = {least} chunks"
        )
    return (
        f"each of the {ranks} bucket ranks holds {tokens_per_rank} tokens, which must be a multiple of "
        f"model.local_chunk_len={chunk_len} and hold max(model.local_n_chunks_before, model.local_n_chunks_after, "
        f"1) = {least} chunks"
    )
