"""The dense LSH attention oracle shared by test_lsh_attention.py and test_more_hashes.py (float64, O(L^2))."""

from __future__ import annotations

import math

import torch

from reformer_dist.kernels.logits import normalize_keys


def dense_lsh_reference(
    qk,
    v,
    buckets,
    *,
    chunk_len,
    n_chunks_before,
    n_chunks_after,
    causal,
    key_valid=None,
    same_bucket_only=False,
    allow_duplicate_attention=True,
):
    """[B, L, H, D] in/out. Softmax over every (window, key) occurrence of query i across all rounds, built densely
    (O(L^2)).

    Chunks are taken over the concatenation of the R sorted rounds and wrap around, like HF/trax.
    Masked occurrences get -1e9 and self occurrences -1e5; in float64 the -1e9 terms contribute exactly
    zero because a self occurrence (-1e5) is always present, so only visible and self occurrences count.
    """
    qk, v = qk.transpose(1, 2), v.transpose(1, 2)
    b, h, l, d = qk.shape
    r = buckets.shape[2]
    k = normalize_keys(qk)
    dots = qk @ k.transpose(-1, -2)  # [B,H,L,L]
    # independent sort: unique keys bucket*L + position, so no stability question arises
    order = torch.argsort(buckets * l + torch.arange(l), dim=-1)
    rank = torch.argsort(order, dim=-1)  # rank[p] = slot of position p within its round
    n = r * l // chunk_len
    chunk = (rank + torch.arange(r).view(1, 1, r, 1) * l) // chunk_len  # [B,H,R,L]
    i_idx = torch.arange(l).view(l, 1)
    j_idx = torch.arange(l).view(1, l)
    allowed = torch.ones(b, h, l, l, dtype=torch.bool)
    if causal:
        allowed &= i_idx >= j_idx
    if key_valid is not None:
        allowed &= key_valid[:, None, None, :]
    m_all = torch.zeros(b, h, l, l, dtype=torch.float64)
    m_vis = torch.zeros_like(m_all)
    m_self = torch.zeros_like(m_all)
    eye = i_idx == j_idx
    for r1 in range(r):
        for r2 in range(r):
            diff = torch.remainder(chunk[:, :, r2, None, :] - chunk[:, :, r1, :, None], n)
            occ = torch.zeros(b, h, l, l, dtype=torch.bool)
            for o in range(-n_chunks_before, n_chunks_after + 1):
                occ |= diff == (o % n)
            vis = occ & allowed & ~eye
            if same_bucket_only:
                vis &= buckets[:, :, r1, :, None] == buckets[:, :, r2, None, :]
            m_all += occ
            m_vis += vis
            m_self += occ & eye
    val = dots - (0 if allow_duplicate_attention else m_all.clamp(min=1).log())
    logw = torch.where(m_vis > 0, m_vis.log() + val, torch.full_like(val, -math.inf))
    logw = torch.where(eye, m_self.log() - 1e5, logw)
    return (torch.softmax(logw, dim=-1) @ v).transpose(1, 2)
