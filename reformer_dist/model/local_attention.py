"""Local (chunked, windowed) attention and full attention layers: separate Q, K, V, no hashing.

Shapes: B batch, L length, H heads, D head size, M chunk length. Tensors stay in [B, L, H, D].
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from reformer_dist.kernels.backends import Backend
from reformer_dist.kernels.chunked_attention import chunked_attention
from reformer_dist.model.bucket_rules import full_attention_problem
from reformer_dist.model.config import ReformerConfig
from reformer_dist.model.context import AttentionContext
from reformer_dist.model.head_groups import HeadLinear


def local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    chunk_len: int,
    n_chunks_before: int,
    n_chunks_after: int,
    causal: bool,
    key_valid: Tensor | None = None,
    document_ids: Tensor | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """Each chunk of M positions attends to itself and its neighbour chunks (HF "local"). [B,L,H,D] in/out."""
    length = q.shape[1]
    if length <= chunk_len:
        chunk_len, n_chunks_before, n_chunks_after = length, 0, 0
    out, _ = chunked_attention(
        q,
        k,
        v,
        None,
        chunk_len=chunk_len,
        n_chunks_before=n_chunks_before,
        n_chunks_after=n_chunks_after,
        causal=causal,
        self_mask=False,
        key_valid=key_valid,
        document_ids=document_ids,
        backend=backend,
    )
    return out


def full_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    key_valid: Tensor | None = None,
    document_ids: Tensor | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """Ordinary softmax attention over the whole sequence. [B,L,H,D] in/out.

    Without padding or documents this is SDPA (memory-efficient kernels where the platform has them); with
    them it is the attention core with one chunk, whose logits are O(L^2): "full" layers are for short
    contexts.
    """
    if key_valid is None and document_ids is None:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        return out.transpose(1, 2)
    return local_attention(
        q,
        k,
        v,
        chunk_len=q.shape[1],
        n_chunks_before=0,
        n_chunks_after=0,
        causal=causal,
        key_valid=key_valid,
        document_ids=document_ids,
        backend=backend,
    )


class LocalSelfAttention(nn.Module):
    """Local ("local") or full ("full") attention with separate Q, K, V projections; output [B, L, H*D]."""

    def __init__(self, cfg: ReformerConfig, layer_idx: int, full: bool = False):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.full = full
        inner = cfg.n_heads * cfg.d_head
        self.query = HeadLinear(cfg.d_model, inner, cfg.d_head, heads_in=False)
        self.key = HeadLinear(cfg.d_model, inner, cfg.d_head, heads_in=False)
        self.value = HeadLinear(cfg.d_model, inner, cfg.d_head, heads_in=False)

    def projections(self) -> tuple[HeadLinear, ...]:
        """The input projections, in the order ``attend`` takes their outputs."""
        return self.query, self.key, self.value

    def forward(self, x: Tensor, ctx: AttentionContext) -> Tensor:
        b, l, _ = x.shape
        hd = (self.cfg.n_heads, self.cfg.d_head)
        q, k, v = (proj(x).view(b, l, *hd) for proj in self.projections())
        return ctx.attend(self.attend, q, k, v).reshape(b, l, -1)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        """Core on [B, L, H', D] tensors."""
        cfg = self.cfg
        if ctx.bucket is not None:  # this rank holds a slice of the sequence: halo chunks from its neighbours
            if self.full:
                raise ValueError(full_attention_problem(cfg.attn_layers))
            return ctx.bucket.local(
                q,
                k,
                v,
                chunk_len=cfg.local_chunk,
                n_chunks_before=cfg.local_n_chunks_before,
                n_chunks_after=cfg.local_n_chunks_after,
                causal=cfg.causal,
                backend=ctx.backend,
            )
        if self.full:
            return full_attention(
                q, k, v, causal=cfg.causal, key_valid=ctx.key_valid, document_ids=ctx.document_ids, backend=ctx.backend
            )
        return local_attention(
            q,
            k,
            v,
            chunk_len=cfg.local_chunk,
            n_chunks_before=cfg.local_n_chunks_before,
            n_chunks_after=cfg.local_n_chunks_after,
            causal=cfg.causal,
            key_valid=ctx.key_valid,
            document_ids=ctx.document_ids,
            backend=ctx.backend,
        )
