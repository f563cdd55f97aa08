"""Pure PyTorch reference of the chunked attention core: the oracle every fused kernel is tested against.

Shape legend: B batch, H heads, N chunks (all hash rounds concatenated), M chunk length,
W = (1 + n_before + n_after) * M keys per query, D head size, R hash rounds, L sequence length.

The boundary (see ``reformer_dist.kernels.chunked_attention``): queries/keys/values already sorted and
chunked, original positions per slot; returns each query's output and log-sum-exp over the keys it saw.
Masks use replacement (HF semantics): keys hidden by causality, padding or bucket get ``mask_value``;
then a query's own position gets ``self_mask_value`` so a token sees itself only when nothing else is
visible. Chunk look-around wraps over the concatenated rounds, exactly as HF/trax do.
"""

from __future__ import annotations

import torch
from torch import Tensor

MASK_VALUE = -1e9
SELF_MASK_VALUE = -1e5


def look_around(x: Tensor, n_before: int, n_after: int) -> Tensor:
    """[B, H, N, M, ...] -> [B, H, N, (1+n_before+n_after)*M, ...]: each chunk with its neighbours (wrapping)."""
    if n_before == 0 and n_after == 0:
        return x
    # roll(shifts=-o)[c] == x[c + o]
    parts = [x if o == 0 else torch.roll(x, shifts=-o, dims=2) for o in range(-n_before, n_after + 1)]
    return torch.cat(parts, dim=3)


def duplicate_counts(q_pos: Tensor, k_pos: Tensor, chunk_of: Tensor, n_before: int, n_after: int) -> Tensor:
    """How often key j occurs among all of query i's windows over all rounds (>= 1 for visible slots).

    q_pos [B,H,N,M], k_pos [B,H,N,W], chunk_of [B,H,R,L] = flat chunk index of each position per round.
    """
    b, h, n, m = q_pos.shape  # n may be a block of the N chunks
    r = chunk_of.shape[2]
    n_total = r * chunk_of.shape[3] // m
    cq = chunk_of.gather(3, q_pos.reshape(b, h, 1, n * m).expand(b, h, r, n * m)).view(b, h, r, n, m)
    ck = chunk_of.gather(3, k_pos.reshape(b, h, 1, -1).expand(b, h, r, k_pos.shape[2] * k_pos.shape[3]))
    ck = ck.view(b, h, r, n, k_pos.shape[3])
    counts = torch.zeros(b, h, n, m, k_pos.shape[3], dtype=torch.int32, device=q_pos.device)
    for r1 in range(r):
        for r2 in range(r):
            diff = torch.remainder(ck[:, :, r2, :, None, :] - cq[:, :, r1, :, :, None], n_total)
            for o in range(-n_before, n_after + 1):
                counts += diff == (o % n_total)
    return counts


def masked_logits(q: Tensor, kw: Tensor, pos: Tensor, k_pos: Tensor, *, n_before: int, n_after: int, causal: bool,
                  self_mask: bool, kv_w: Tensor | None = None, bucket: Tensor | None = None,
                  bucket_w: Tensor | None = None, chunk_of: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Logits of queries q [B,H,n,M,D] against their windows kw [B,H,n,W,D] after all masks.

    Returns (logits in the accumulation dtype, bool mask of entries replaced by a constant or None);
    replaced entries have zero derivative, which the blockwise backward needs to know.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dots = torch.matmul(q, kw.transpose(-1, -2)).to(acc)
    if chunk_of is not None:
        dots = dots - duplicate_counts(pos, k_pos, chunk_of, n_before, n_after).to(acc).log()
    visible = None
    if causal:
        visible = pos.unsqueeze(-1) >= k_pos.unsqueeze(-2)
    if kv_w is not None:
        visible = kv_w.unsqueeze(-2) if visible is None else visible & kv_w.unsqueeze(-2)
    if bucket is not None:
        same = bucket.unsqueeze(-1) == bucket_w.unsqueeze(-2)
        visible = same if visible is None else visible & same
    replaced = None if visible is None else ~visible
    if replaced is not None:
        dots = dots.masked_fill(replaced, MASK_VALUE)
    if self_mask:
        is_self = pos.unsqueeze(-1) == k_pos.unsqueeze(-2)
        dots = dots.masked_fill(is_self, SELF_MASK_VALUE)
        replaced = is_self if replaced is None else replaced | is_self
    return dots, replaced


def chunked_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos: Tensor,
    *,
    n_before: int,
    n_after: int,
    causal: bool,
    self_mask: bool,
    key_valid: Tensor | None = None,
    bucket: Tensor | None = None,
    chunk_of: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of each chunk over itself and its neighbours, by plain autograd (the oracle).

    q, k, v: [B,H,N,M,D] (k already normalised/scaled); pos: [B,H,N,M] int64 original positions;
    key_valid: [B,H,N,M] bool (False = padding, never attended); bucket: [B,H,N,M] for the
    same-bucket-only mask; chunk_of: [B,H,R,L] for the duplicate-attention correction.
    Returns out [B,H,N,M,D] (dtype of v) and lse [B,H,N,M] (float32, or float64 for float64 inputs).
    """
    nb, na = n_before, n_after
    dots, _ = masked_logits(
        q, look_around(k, nb, na), pos, look_around(pos, nb, na), n_before=nb, n_after=na, causal=causal,
        self_mask=self_mask, kv_w=None if key_valid is None else look_around(key_valid, nb, na), bucket=bucket,
        bucket_w=None if bucket is None else look_around(bucket, nb, na), chunk_of=chunk_of)
    lse = torch.logsumexp(dots, dim=-1)
    probs = torch.exp(dots - lse.unsqueeze(-1))
    out = torch.matmul(probs.to(v.dtype), look_around(v, nb, na))
    return out, lse
