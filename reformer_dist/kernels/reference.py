"""Pure PyTorch reference of the attention core: the oracle every other core is tested against.

Plain autograd over explicit sorted copies: gather q, keys and v into slot order, chunk, concatenate each
chunk with its neighbours, mask, softmax per round, unsort, and merge the rounds by log-sum-exp exactly as
HF does. Memory O(S * W) logits: use it for tests and small calls (``backend="auto"`` does so only when all
logits fit in one block of the blockwise core). The contract is in ``chunked_attention``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reformer_dist.kernels.logits import (acc_dtype, chunk_of_positions, duplicate_counts, masked_logits,
                                          normalize_keys, scale_keys)


def look_around(x: Tensor, n_before: int, n_after: int) -> Tensor:
    """[B, H, N, M, ...] -> [B, H, N, (1+n_before+n_after)*M, ...]: each chunk with its neighbours (wrapping)."""
    if n_before == 0 and n_after == 0:
        return x
    # roll(shifts=-o)[c] == x[c + o]
    parts = [x if o == 0 else torch.roll(x, shifts=-o, dims=2) for o in range(-n_before, n_after + 1)]
    return torch.cat(parts, dim=3)


def slot_positions(index: Tensor | None, b: int, h: int, length: int, device: torch.device) -> Tensor:
    """[B, H, S] int64 original position of every sorted slot (the identity when index is None)."""
    if index is None:
        return torch.arange(length, device=device).expand(b, h, length)
    return index.long()


def chunked_attention_reference(q: Tensor, k: Tensor | None, v: Tensor, index: Tensor | None = None, *,
                                chunk_len: int, n_before: int, n_after: int, causal: bool, self_mask: bool = True,
                                key_valid: Tensor | None = None, slot_bucket: Tensor | None = None,
                                doc_ids: Tensor | None = None, dedup: bool = False) -> tuple[Tensor, Tensor]:
    """Attention of every chunk of sorted slots over itself and its neighbours, merged over rounds (autograd)."""
    b, length, h, d = q.shape
    keys = normalize_keys(q) if k is None else scale_keys(k)
    pos_s = slot_positions(index, b, h, length, q.device)  # [B,H,S]
    s = pos_s.shape[-1]
    r, m = s // length, chunk_len
    n = s // m
    nb, na = n_before, n_after

    def sort(x: Tensor) -> Tensor:  # [B,L,H,D] -> [B,H,N,M,D] in slot order
        return x.transpose(1, 2).gather(2, pos_s.unsqueeze(-1).expand(b, h, s, x.shape[-1])).view(b, h, n, m, -1)

    pos = pos_s.view(b, h, n, m)
    kv = None if key_valid is None else key_valid.gather(1, pos_s.reshape(b, h * s)).view(b, h, n, m)
    doc = None if doc_ids is None else doc_ids.gather(1, pos_s.reshape(b, h * s)).view(b, h, n, m)
    bucket = None if slot_bucket is None else slot_bucket.view(b, h, n, m)
    counts = None
    if dedup:
        counts = duplicate_counts(pos, look_around(pos, nb, na), chunk_of_positions(pos_s, length, m), nb, na)
    dots, _ = masked_logits(sort(q), look_around(sort(keys), nb, na), pos, look_around(pos, nb, na), causal=causal,
                            self_mask=self_mask, k_valid=None if kv is None else look_around(kv, nb, na),
                            q_bucket=bucket, k_bucket=None if bucket is None else look_around(bucket, nb, na),
                            q_doc=doc, k_doc=None if doc is None else look_around(doc, nb, na), counts=counts)
    lse_s = torch.logsumexp(dots, dim=-1)  # [B,H,N,M]
    out_s = torch.matmul(torch.softmax(dots, dim=-1).to(v.dtype), look_around(sort(v), nb, na))
    # unsort every round, then merge the rounds: softmax over their log-sum-exps (HF's merge)
    where = pos_s.view(b, h, r, length)
    lse_r = torch.zeros(b, h, r, length, dtype=lse_s.dtype, device=q.device).scatter(3, where, lse_s.view(b, h, r, length))
    out_r = torch.zeros(b, h, r, length, d, dtype=out_s.dtype, device=q.device).scatter(
        3, where.unsqueeze(-1).expand(b, h, r, length, d), out_s.view(b, h, r, length, d))
    if r == 1:
        out, lse = out_r[:, :, 0], lse_r[:, :, 0]
    else:
        lse = torch.logsumexp(lse_r, dim=2)
        w = torch.softmax(lse_r, dim=2).unsqueeze(-1)  # normalised: exact for a query that sees only itself
        out = (out_r.to(acc_dtype(out_r)) * w).sum(dim=2).to(v.dtype)
    return out.transpose(1, 2), lse.transpose(1, 2)
