"""How one attention logit is formed, shared by every attention core: keys, masks, duplicate correction.

Legend: B batch, H heads (or a head group), L length, D head size, R hash rounds, S = R*L sorted slots,
M chunk length, n query chunks of a block, W = (1 + n_chunks_before + n_chunks_after) * M keys per query.

Masks work by replacement (HF semantics): keys hidden by causality, padding or bucket get ``MASK_VALUE``;
then a query's own position gets ``SELF_MASK_VALUE``, so a token attends to itself only when nothing else
is visible. Replaced entries carry no gradient (``keep`` is 0 there).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MASK_VALUE = -1e9
SELF_MASK_VALUE = -1e5
KEY_NORM_EPS = 1e-6


def acc_dtype(t: Tensor) -> torch.dtype:
    """Accumulation dtype of a core: float64 for float64 inputs (parity tests), else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def normalize_keys(qk: Tensor) -> Tensor:
    """Keys of shared-QK attention: unit RMS length, then scaled by 1/sqrt(D) (HF ``_len_and_dim_norm``).

    Half types are normalised in fp32 and cast back, so every core sees the same keys.
    """
    x = qk if qk.dtype in (torch.float32, torch.float64) else qk.float()
    var = x.pow(2).mean(-1, keepdim=True)
    return (x * torch.rsqrt(var + KEY_NORM_EPS) / math.sqrt(qk.shape[-1])).to(qk.dtype)


def normalize_keys_backward(qk: Tensor, dk: Tensor) -> Tensor:
    """Gradient w.r.t. qk of ``normalize_keys(qk)`` given the keys' gradient dk (in dk's dtype).

    k = x r c with r = (mean(x^2) + eps)^-1/2 and c = 1/sqrt(D), so dx = r c (dk - x r^2 (x . dk) / D).
    """
    x = qk.to(dk.dtype)
    d = x.shape[-1]
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + KEY_NORM_EPS)
    dot = (x * dk).sum(-1, keepdim=True)
    return (r / math.sqrt(d)) * (dk - x * (r * r * dot / d))


def scale_keys(k: Tensor) -> Tensor:
    """Keys of ordinary (local/full) attention: scaled by 1/sqrt(D)."""
    return k / math.sqrt(k.shape[-1])


def chunk_of_positions(index: Tensor, length: int, chunk_len: int) -> Tensor:
    """Flat chunk (over all rounds) holding each position in each round: [B,H,S] slot->position -> [B,H,R,L].

    Used by the duplicate-attention correction; int32 to keep it compact.
    """
    b, h, s = index.shape
    r = s // length
    slots = torch.arange(s, device=index.device, dtype=torch.int32).view(1, 1, r, length)
    out = torch.empty(b, h, r, length, dtype=torch.int32, device=index.device)
    out.scatter_(
        3,
        index.view(b, h, r, length).long(),
        torch.div(slots, chunk_len, rounding_mode="floor").to(torch.int32).expand(b, h, r, length),
    )
    return out


def duplicate_counts(
    q_rows: Tensor, k_rows: Tensor, chunk_of: Tensor, n_chunks_before: int, n_chunks_after: int, n_chunks: int
) -> Tensor:
    """How often key j occurs among all of query i's windows over all rounds (>= 1 for visible slots).

    q_rows [B,H,n,M], k_rows [B,H,n,W] rows of the tokens; chunk_of [B,H,R,rows] the flat chunk (of all
    ``n_chunks`` chunks over all rounds) holding each row's token in each round (``chunk_of_positions``).
    """
    b, h, n, m = q_rows.shape
    r = chunk_of.shape[2]
    cq = chunk_of.gather(3, q_rows.reshape(b, h, 1, n * m).expand(b, h, r, n * m).long()).view(b, h, r, n, m)
    w = k_rows.shape[3]
    ck = chunk_of.gather(3, k_rows.reshape(b, h, 1, n * w).expand(b, h, r, n * w).long()).view(b, h, r, n, w)
    counts = torch.zeros(b, h, n, m, w, dtype=torch.int32, device=q_rows.device)
    for r1 in range(r):
        for r2 in range(r):
            diff = torch.remainder(ck[:, :, r2, :, None, :] - cq[:, :, r1, :, :, None], n_chunks)
            for o in range(-n_chunks_before, n_chunks_after + 1):
                counts += diff == (o % n_chunks)
    return counts


def masked_logits(
    q: Tensor,
    kw: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    *,
    causal: bool,
    self_mask: bool,
    k_valid: Tensor | None = None,
    q_bucket: Tensor | None = None,
    k_bucket: Tensor | None = None,
    q_doc: Tensor | None = None,
    k_doc: Tensor | None = None,
    counts: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Logits of queries q [B,H,n,M,D] against their windows kw [B,H,n,W,D] after all masks.

    q_pos [B,H,n,M] and k_pos [B,H,n,W] are original positions; k_valid [B,H,n,W] marks real keys;
    q_bucket/k_bucket enable the same-bucket-only mask and q_doc/k_doc the same-document mask; counts
    [B,H,n,M,W] the duplicate correction (subtract log count). Returns (logits in the accumulation dtype,
    ``keep``: 1.0 where the logit is the product, 0.0 where a constant replaced it; None when nothing is masked).

    The replacement is ``fill + logits * keep`` (exact: keep is 0 or 1, fill 0 where keep is 1): on CPU,
    masked_fill and where with a bool mask cost ~10x a multiply-add, and bool -> float ~8x uint8 -> float.
    """
    acc = acc_dtype(q)
    dots = torch.matmul(q, kw.transpose(-1, -2)).to(acc)
    if counts is not None:  # >= 1 for every key of a window; the clamp keeps halo queries of a piece finite
        dots = dots - counts.clamp(min=1).to(acc).log()
    visible = None
    if causal:
        visible = q_pos.unsqueeze(-1) >= k_pos.unsqueeze(-2)
    if k_valid is not None:
        visible = k_valid.unsqueeze(-2) if visible is None else visible & k_valid.unsqueeze(-2)
    for a, b in ((q_bucket, k_bucket), (q_doc, k_doc)):
        if a is not None:
            assert b is not None  # the query and key sides come in pairs
            same = a.unsqueeze(-1) == b.unsqueeze(-2)
            visible = same if visible is None else visible & same
    is_self = (q_pos.unsqueeze(-1) == k_pos.unsqueeze(-2)) if self_mask else None
    if visible is None and is_self is None:
        return dots, None
    shape = dots.shape
    hidden = None if visible is None else (~visible).expand(shape)
    if hidden is not None and is_self is not None:
        hidden = hidden & ~is_self  # the self value wins over the mask value
    # each replacing constant where its mask is set; fresh float tensors, so each step is one in-place pass
    fill = replaced = None
    for mask, value in ((hidden, MASK_VALUE), (is_self, SELF_MASK_VALUE)):
        if mask is None:
            continue
        if fill is None:
            fill, replaced = _as_float(mask, acc).mul_(value), mask
        else:
            assert replaced is not None
            fill.add_(_as_float(mask, acc), alpha=value)
            replaced = replaced | mask
    assert fill is not None and replaced is not None  # one of the masks is set (the early return above)
    keep = _as_float(~replaced.expand(shape), acc)
    return torch.addcmul(fill.expand(shape), dots, keep), keep


def _as_float(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask as 0.0 / 1.0 (through uint8: ATen's bool -> float conversion is the slow one on CPU)."""
    return mask.contiguous().view(torch.uint8).to(dtype)
