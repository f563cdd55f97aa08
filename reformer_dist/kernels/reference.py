"""Pure PyTorch reference of the attention core: the oracle every other core is tested against.

Plain autograd over explicit sorted copies: gather q, keys and v into slot order, chunk, concatenate each
chunk with its neighbours, mask, softmax per round, unsort, and merge the rounds by log-sum-exp exactly as
HF does. Memory O(S * W) logits: use it for tests and small calls (``backend="auto"`` does so only when all
logits fit in one block of the blockwise core). The contract is in ``chunked_attention``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reformer_dist.kernels.logits import (
    acc_dtype,
    chunk_of_positions,
    duplicate_counts,
    masked_logits,
    normalize_keys,
    scale_keys,
)


def look_around(x: Tensor, n_chunks_before: int, n_chunks_after: int) -> Tensor:
    """[B, H, N, M, ...] -> [B, H, N, (1 + n_chunks_before + n_chunks_after) * M, ...]: each chunk with its
    neighbours (wrapping)."""
    if n_chunks_before == 0 and n_chunks_after == 0:
        return x
    # roll(shifts=-o)[c] == x[c + o]
    parts = [x if o == 0 else torch.roll(x, shifts=-o, dims=2) for o in range(-n_chunks_before, n_chunks_after + 1)]
    return torch.cat(parts, dim=3)


def slot_positions(index: Tensor | None, b: int, h: int, length: int, device: torch.device) -> Tensor:
    """[B, H, S] int64 original position of every sorted slot (the identity when index is None)."""
    if index is None:
        return torch.arange(length, device=device).expand(b, h, length)
    return index.long()


def chunked_attention_reference(
    q: Tensor,
    k: Tensor | None,
    v: Tensor,
    index: Tensor | None = None,
    *,
    chunk_len: int,
    n_chunks_before: int,
    n_chunks_after: int,
    causal: bool,
    self_mask: bool = True,
    key_valid: Tensor | None = None,
    slot_bucket: Tensor | None = None,
    document_ids: Tensor | None = None,
    allow_duplicate_attention: bool = True,
    positions: Tensor | None = None,
    chunk_of: Tensor | None = None,
    n_chunks: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of every chunk of sorted slots over itself and its neighbours, merged over rounds (autograd)."""
    b, length, h, d = q.shape
    keys = normalize_keys(q) if k is None else scale_keys(k)
    rows_s = slot_positions(index, b, h, length, q.device)  # [B,H,S]
    s = rows_s.shape[-1]
    r, m = s // length, chunk_len
    n = s // m
    nb, na = n_chunks_before, n_chunks_after

    def sort(x: Tensor) -> Tensor:  # [B,L,H,D] -> [B,H,N,M,D] in slot order
        return x.transpose(1, 2).gather(2, rows_s.unsqueeze(-1).expand(b, h, s, x.shape[-1])).view(b, h, n, m, -1)

    def per_slot(x: Tensor | None) -> Tensor | None:  # [B, L] per row -> [B,H,N,M]
        return None if x is None else x.gather(1, rows_s.reshape(b, h * s)).view(b, h, n, m)

    def around(x: Tensor) -> Tensor:
        return look_around(x, nb, na)

    def around_opt(x: Tensor | None) -> Tensor | None:
        return None if x is None else around(x)

    rows = rows_s.view(b, h, n, m)
    pos = rows if positions is None else positions.long().view(b, h, n, m)
    bucket = None if slot_bucket is None else slot_bucket.view(b, h, n, m)
    counts = None
    if not allow_duplicate_attention:
        co = chunk_of_positions(rows_s, length, m) if chunk_of is None else chunk_of
        counts = duplicate_counts(rows, around(rows), co, nb, na, n if n_chunks is None else n_chunks)
    kv, doc = per_slot(key_valid), per_slot(document_ids)
    dots, _ = masked_logits(
        sort(q),
        around(sort(keys)),
        pos,
        around(pos),
        causal=causal,
        self_mask=self_mask,
        k_valid=around_opt(kv),
        q_bucket=bucket,
        k_bucket=around_opt(bucket),
        q_doc=doc,
        k_doc=around_opt(doc),
        counts=counts,
    )
    lse_s = torch.logsumexp(dots, dim=-1)  # [B,H,N,M]
    out_s = torch.matmul(torch.softmax(dots, dim=-1).to(v.dtype), around(sort(v)))
    # unsort every round, then merge the rounds: softmax over their log-sum-exps (HF's merge)
    where = rows_s.view(b, h, r, length)
    lse_r = torch.zeros(b, h, r, length, dtype=lse_s.dtype, device=q.device).scatter(
        3, where, lse_s.view(b, h, r, length)
    )
    out_r = torch.zeros(b, h, r, length, d, dtype=out_s.dtype, device=q.device).scatter(
        3, where.unsqueeze(-1).expand(b, h, r, length, d), out_s.view(b, h, r, length, d)
    )
    if r == 1:
        out, lse = out_r[:, :, 0], lse_r[:, :, 0]
    else:
        lse = torch.logsumexp(lse_r, dim=2)
        w = torch.softmax(lse_r, dim=2).unsqueeze(-1)  # normalised: exact for a query that sees only itself
        out = (out_r.to(acc_dtype(out_r)) * w).sum(dim=2).to(v.dtype)
    return out.transpose(1, 2), lse.transpose(1, 2)
