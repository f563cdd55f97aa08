"""Memory-lean PyTorch implementation of the chunked attention core (any device).

Same semantics as ``reference.chunked_attention_reference`` but with its own backward: forward keeps
only q, k, v, out and lse, and both passes walk the chunks in blocks, recomputing each block's logits.
Activation memory is O(N*M*D) instead of O(N*M*W) logits, which is what lets long sequences fit; the
algorithm (per-block logits, lse, and dS = P*(dP - rowsum(dO*O) + dlse)) is the one a fused kernel runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reformer_dist.kernels.reference import masked_logits

_BLOCK_ELEMS = 1 << 24  # logits per block (64 MiB in fp32)


def block_elems() -> int:
    """Logits per block; read at call time so tests can shrink it."""
    return _BLOCK_ELEMS


def _window_index(start: int, stop: int, n: int, n_before: int, n_after: int, device) -> Tensor:
    """[n_blk, w] chunk indices of each chunk's look-around window (wrapping)."""
    offsets = torch.arange(-n_before, n_after + 1, device=device)
    return torch.remainder(torch.arange(start, stop, device=device).unsqueeze(1) + offsets, n)


def _window(x: Tensor, idx: Tensor) -> Tensor:
    """x [B,H,N,M,...] -> [B,H,n_blk,w*M,...] gathered along the chunk axis."""
    g = x[:, :, idx]  # [B,H,n_blk,w,M,...]
    return g.flatten(3, 4)


class _BlockwiseAttention(torch.autograd.Function):
    # Both passes run with autocast off: the core fixes its own precision (fp32/fp64 accumulation).
    @staticmethod
    def forward(ctx, q, k, v, pos, key_valid, bucket, chunk_of, n_before, n_after, causal, self_mask):
        with torch.autocast(q.device.type, enabled=False):
            return _BlockwiseAttention._forward(ctx, q, k, v, pos, key_valid, bucket, chunk_of, n_before, n_after,
                                                causal, self_mask)

    @staticmethod
    def _forward(ctx, q, k, v, pos, key_valid, bucket, chunk_of, n_before, n_after, causal, self_mask):
        b, h, n, m, d = q.shape
        w = 1 + n_before + n_after
        blk = max(1, block_elems() // max(1, b * h * m * w * m))
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = torch.empty_like(v)
        lse = torch.empty(b, h, n, m, dtype=acc, device=q.device)
        for s in range(0, n, blk):
            e = min(s + blk, n)
            dots, _ = _block_logits(q, k, pos, key_valid, bucket, chunk_of, s, e, n_before, n_after, causal, self_mask)
            lse_b = torch.logsumexp(dots, dim=-1)
            p = torch.exp(dots - lse_b.unsqueeze(-1))
            idx = _window_index(s, e, n, n_before, n_after, q.device)
            out[:, :, s:e] = torch.matmul(p.to(v.dtype), _window(v, idx))
            lse[:, :, s:e] = lse_b
        ctx.save_for_backward(q, k, v, pos, key_valid, bucket, chunk_of, out, lse)
        ctx.args = (n_before, n_after, causal, self_mask, blk)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            return _BlockwiseAttention._backward(ctx, dout, dlse)

    @staticmethod
    def _backward(ctx, dout, dlse):
        q, k, v, pos, key_valid, bucket, chunk_of, out, lse = ctx.saved_tensors
        n_before, n_after, causal, self_mask, blk = ctx.args
        b, h, n, m, d = q.shape
        w = 1 + n_before + n_after
        acc = lse.dtype
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        dout = torch.zeros_like(out) if dout is None else dout
        for s in range(0, n, blk):
            e = min(s + blk, n)
            idx = _window_index(s, e, n, n_before, n_after, q.device)
            dots, replaced = _block_logits(q, k, pos, key_valid, bucket, chunk_of, s, e, n_before, n_after, causal,
                                           self_mask)
            p = torch.exp(dots - lse[:, :, s:e].unsqueeze(-1))
            do = dout[:, :, s:e].to(acc)
            kw, vw = _window(k, idx).to(acc), _window(v, idx).to(acc)
            dvw = torch.matmul(p.transpose(-1, -2), do)  # [B,H,n_blk,w*M,D]
            dp = torch.matmul(do, vw.transpose(-1, -2))
            delta = (do * out[:, :, s:e].to(acc)).sum(-1, keepdim=True)
            ds = p * (dp - delta)
            if dlse is not None:
                ds = ds + p * dlse[:, :, s:e].to(acc).unsqueeze(-1)
            if replaced is not None:  # constants carry no gradient
                ds = ds.masked_fill(replaced, 0.0)
            dq[:, :, s:e] = torch.matmul(ds, kw)
            dkw = torch.matmul(ds.transpose(-1, -2), q[:, :, s:e].to(acc))
            # scatter the window gradients back to the chunks they were copied from
            dkw = dkw.view(b, h, e - s, w, m, d)
            dvw = dvw.view(b, h, e - s, w, m, d)
            for j in range(w):
                dk.index_add_(2, idx[:, j], dkw[:, :, :, j])
                dv.index_add_(2, idx[:, j], dvw[:, :, :, j])
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None, None


def _block_logits(q, k, pos, key_valid, bucket, chunk_of, s, e, n_before, n_after, causal, self_mask):
    n = q.shape[2]
    idx = _window_index(s, e, n, n_before, n_after, q.device)
    return masked_logits(
        q[:, :, s:e], _window(k, idx), pos[:, :, s:e], _window(pos, idx), n_before=n_before, n_after=n_after,
        causal=causal, self_mask=self_mask, kv_w=None if key_valid is None else _window(key_valid, idx),
        bucket=None if bucket is None else bucket[:, :, s:e], bucket_w=None if bucket is None else _window(bucket, idx),
        chunk_of=chunk_of)


def chunked_attention_blockwise(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, *, n_before: int, n_after: int,
                                causal: bool, self_mask: bool, key_valid: Tensor | None = None,
                                bucket: Tensor | None = None, chunk_of: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as ``chunked_attention_reference``; memory-lean custom backward."""
    return _BlockwiseAttention.apply(q, k, v, pos, key_valid, bucket, chunk_of, n_before, n_after, causal, self_mask)
