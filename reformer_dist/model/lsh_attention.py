"""LSH self-attention (shared QK): hash, sort, chunk, attend, unsort, merge rounds by log-sum-exp.

Shape legend: B batch, L length, H heads, D head size, R rounds, M chunk length, N = R*L/M chunks.
Tensors entering ``lsh_attention`` are [B, H, L, D]; the module works in [B, L, H, D] so that sequence
parallelism can re-shard heads around the core without touching this file.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from reformer_dist.kernels.chunked_attention import chunked_attention
from reformer_dist.model.config import ReformerConfig
from reformer_dist.model.context import AttentionContext
from reformer_dist.model.hashing import hash_buckets, layer_seed, make_rotations, sort_buckets


def normalize_keys(qk: Tensor) -> Tensor:
    """Keys of shared-QK attention: unit RMS length, then scaled by 1/sqrt(D) (HF ``_len_and_dim_norm``)."""
    x = qk if qk.dtype in (torch.float32, torch.float64) else qk.float()  # half types: normalise in fp32
    var = x.pow(2).mean(-1, keepdim=True)
    return (x * torch.rsqrt(var + 1e-6) / math.sqrt(qk.shape[-1])).to(qk.dtype)


def full_self_attention(qk: Tensor, v: Tensor, *, causal: bool, key_valid: Tensor | None, backend: str = "auto") -> Tensor:
    """One-chunk case (L <= chunk_len): plain attention with the same causal/self/padding masks."""
    b, h, l, d = qk.shape
    pos = torch.arange(l, device=qk.device).expand(b, h, 1, l)
    kv = None if key_valid is None else key_valid[:, None, None, :].expand(b, h, 1, l)
    out, _ = chunked_attention(qk.unsqueeze(2), normalize_keys(qk).unsqueeze(2), v.unsqueeze(2), pos,
                               n_before=0, n_after=0, causal=causal, self_mask=True, key_valid=kv,
                               backend=backend)
    return out.squeeze(2)


def lsh_attention(
    qk: Tensor,
    v: Tensor,
    rotations: Tensor,
    factors: list[int],
    *,
    chunk_len: int,
    n_before: int,
    n_after: int,
    causal: bool,
    key_valid: Tensor | None = None,
    same_bucket_only: bool = False,
    allow_duplicate_attention: bool = True,
    backend: str = "auto",
    return_buckets: bool = False,
):
    """LSH attention of qk, v [B, H, L, D] with rotations [H, D, R, F]; returns [B, H, L, D].

    L must be a multiple of chunk_len (the model pads); key_valid [B, L] marks real tokens.
    """
    b, h, l, d = qk.shape
    if l <= chunk_len:
        out = full_self_attention(qk, v, causal=causal, key_valid=key_valid, backend=backend)
        return (out, None) if return_buckets else out
    if l % chunk_len:
        raise ValueError(f"lsh_attention: length {l} is not a multiple of chunk_len {chunk_len} (pad first)")
    r = rotations.shape[2]
    buckets = hash_buckets(qk, rotations, factors, key_valid)  # [B,H,R,L]
    perm, undo = sort_buckets(buckets)
    n = r * l // chunk_len

    flat = perm.reshape(b, h, r * l)
    idx = flat.unsqueeze(-1).expand(b, h, r * l, d)
    qk_s = qk.gather(2, idx).view(b, h, n, chunk_len, d)
    v_s = v.gather(2, idx).view(b, h, n, chunk_len, d)
    pos = flat.view(b, h, n, chunk_len)
    kv = None
    if key_valid is not None:
        kv = key_valid[:, None, :].expand(b, h, l).gather(2, flat).view(b, h, n, chunk_len)
    bucket_s = buckets.gather(3, perm).view(b, h, n, chunk_len) if same_bucket_only else None
    chunk_of = None
    if not allow_duplicate_attention:
        rounds = torch.arange(r, device=qk.device).view(1, 1, r, 1) * l
        chunk_of = torch.div(undo + rounds, chunk_len, rounding_mode="floor")

    out, lse = chunked_attention(qk_s, normalize_keys(qk_s), v_s, pos, n_before=n_before, n_after=n_after,
                                 causal=causal, self_mask=True, key_valid=kv, bucket=bucket_s,
                                 chunk_of=chunk_of, backend=backend)
    out = out.view(b, h, r, l, d).gather(3, undo.unsqueeze(-1).expand(b, h, r, l, d))
    lse = lse.view(b, h, r, l).gather(3, undo)
    if r == 1:
        res = out[:, :, 0]
    else:
        w = torch.softmax(lse, dim=2).unsqueeze(-1)  # exact merge: one softmax over the union of rounds
        res = (out * w.to(out.dtype)).sum(dim=2)
    return (res, buckets) if return_buckets else res


class LSHSelfAttention(nn.Module):
    """Shared-QK LSH attention: projections + core. Output [B, L, H*D] (the block applies the output proj)."""

    def __init__(self, cfg: ReformerConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.query_key = nn.Linear(cfg.d_model, cfg.n_heads * cfg.d_head, bias=False)
        self.value = nn.Linear(cfg.d_model, cfg.n_heads * cfg.d_head, bias=False)

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
        l = qk.shape[1]
        factors = cfg.bucket_factors(l)
        rot = make_rotations(layer_seed(ctx.hash_seed, self.layer_idx), cfg.n_heads, cfg.d_head, cfg.n_hashes,
                             factors, qk.device)
        rot = rot[ctx.head_offset : ctx.head_offset + qk.shape[2]]
        out = lsh_attention(qk.transpose(1, 2), v.transpose(1, 2), rot, factors, chunk_len=cfg.chunk_len,
                            n_before=cfg.n_chunks_before, n_after=cfg.n_chunks_after, causal=cfg.causal,
                            key_valid=ctx.key_valid, same_bucket_only=cfg.same_bucket_only,
                            allow_duplicate_attention=cfg.allow_duplicate_attention, backend=ctx.backend)
        return out.transpose(1, 2)
