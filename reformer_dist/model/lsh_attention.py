"""LSH self-attention (shared QK): hash, sort, then one memory-lean attention core over the sorted order.

Shape legend: B batch, L length, H heads, D head size, R rounds, M chunk length, S = R*L sorted slots.
Tensors stay in the projections' [B, L, H, D] layout throughout: hashing reads qk in blocks, the sort
permutation ([B, H, S] int32) is all that is built from it, and the attention core
(``kernels.chunked_attention``) reads queries, keys and values through that permutation and returns the
output already merged over rounds. Sequence parallelism re-shards heads around ``attend`` without
touching this file.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from reformer_dist.kernels.backends import Backend
from reformer_dist.kernels.chunked_attention import chunked_attention
from reformer_dist.model.config import ReformerConfig
from reformer_dist.model.context import AttentionContext
from reformer_dist.model.hashing import hash_buckets, layer_seed, make_rotations, sort_buckets
from reformer_dist.model.head_groups import HeadLinear


def lsh_attention(
    qk: Tensor,
    v: Tensor,
    rotations: Tensor,
    factors: list[int],
    *,
    chunk_len: int,
    n_chunks_before: int,
    n_chunks_after: int,
    causal: bool,
    key_valid: Tensor | None = None,
    document_ids: Tensor | None = None,
    same_bucket_only: bool = False,
    allow_duplicate_attention: bool = True,
    backend: Backend = "auto",
    return_buckets: bool = False,
):
    """LSH attention of qk, v [B, L, H, D] with rotations [H, D, R, F]; returns [B, L, H, D].

    L must be a multiple of chunk_len (the model pads); key_valid [B, L] marks real tokens. With document_ids
    [B, L] a token attends only to its own document, and each round is sorted by (document, bucket,
    position): a document's tokens fill the same slots whatever another document holds, so no document can
    move another's chunk windows. With ``return_buckets`` also returns the bucket ids [B, H, R, L] (None
    for a single chunk).
    """
    length = qk.shape[1]
    if length <= chunk_len:  # one chunk: plain attention with the same masks, hashing is irrelevant
        out, _ = chunked_attention(
            qk,
            None,
            v,
            None,
            chunk_len=length,
            n_chunks_before=0,
            n_chunks_after=0,
            causal=causal,
            self_mask=True,
            key_valid=key_valid,
            document_ids=document_ids,
            backend=backend,
        )
        return (out, None) if return_buckets else out
    buckets = hash_buckets(qk, rotations, factors, key_valid)  # [B,H,R,L] int32
    if document_ids is None:
        perm = sort_buckets(buckets)  # [B,H,R*L] int32
    else:  # (document, bucket) keys: one bucket id space per document (padding is a bucket of its own)
        perm = sort_buckets(document_ids[:, None, None, :].long() * (math.prod(factors) + 1) + buckets)
    slot_bucket = (
        buckets.view(*buckets.shape[:2], -1).gather(2, _round_offsets(perm, length)) if same_bucket_only else None
    )
    out, _ = chunked_attention(
        qk,
        None,
        v,
        perm,
        chunk_len=chunk_len,
        n_chunks_before=n_chunks_before,
        n_chunks_after=n_chunks_after,
        causal=causal,
        self_mask=True,
        key_valid=key_valid,
        slot_bucket=slot_bucket,
        document_ids=document_ids,
        allow_duplicate_attention=allow_duplicate_attention,
        backend=backend,
    )
    return (out, buckets) if return_buckets else out


def _round_offsets(perm: Tensor, length: int) -> Tensor:
    """Index into buckets flattened over rounds: slot r*L + s of perm -> r*L + perm (int64)."""
    r = perm.shape[-1] // length
    rounds = torch.arange(r, device=perm.device).repeat_interleave(length) * length
    return perm.long() + rounds


class LSHSelfAttention(nn.Module):
    """Shared-QK LSH attention: projections + core. Output [B, L, H*D] (the block applies the output proj)."""

    def __init__(self, cfg: ReformerConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.query_key = HeadLinear(cfg.d_model, cfg.n_heads * cfg.d_head, cfg.d_head, heads_in=False)
        self.value = HeadLinear(cfg.d_model, cfg.n_heads * cfg.d_head, cfg.d_head, heads_in=False)

    def projections(self) -> tuple[HeadLinear, ...]:
        """The input projections, in the order ``attend`` takes their outputs."""
        return self.query_key, self.value

    def forward(self, x: Tensor, ctx: AttentionContext) -> Tensor:
        b, l, _ = x.shape
        hd = (self.cfg.n_heads, self.cfg.d_head)
        qk = self.query_key(x).view(b, l, *hd)
        v = self.value(x).view(b, l, *hd)
        out = ctx.attend(self.attend, qk, v)
        return out.reshape(b, l, -1)

    def attend(self, qk: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        """Core on [B, L, H', D] tensors, H' <= H heads starting at ``ctx.head_offset``."""
        cfg = self.cfg
        length = qk.shape[1] * (1 if ctx.bucket is None else ctx.bucket.size)  # the whole sequence's length
        factors = cfg.bucket_factors(length)
        rounds = cfg.n_hashes if ctx.n_hashes is None else ctx.n_hashes
        rot = make_rotations(
            layer_seed(ctx.hash_seed, self.layer_idx),
            cfg.n_heads,
            cfg.d_head,
            rounds,
            factors,
            qk.device,
            trained_hashes=cfg.n_hashes,
        )
        rot = rot[ctx.head_offset : ctx.head_offset + qk.shape[2]]
        if ctx.bucket is not None:  # this rank holds a slice of the sequence: shard the sorted order
            return ctx.bucket.lsh(
                qk,
                v,
                rot,
                factors,
                chunk_len=cfg.chunk_len,
                n_chunks_before=cfg.n_chunks_before,
                n_chunks_after=cfg.n_chunks_after,
                causal=cfg.causal,
                same_bucket_only=cfg.same_bucket_only,
                allow_duplicate_attention=cfg.allow_duplicate_attention,
                backend=ctx.backend,
            )
        return lsh_attention(
            qk,
            v,
            rot,
            factors,
            chunk_len=cfg.chunk_len,
            n_chunks_before=cfg.n_chunks_before,
            n_chunks_after=cfg.n_chunks_after,
            causal=cfg.causal,
            key_valid=ctx.key_valid,
            document_ids=ctx.document_ids,
            same_bucket_only=cfg.same_bucket_only,
            allow_duplicate_attention=cfg.allow_duplicate_attention,
            backend=ctx.backend,
        )
