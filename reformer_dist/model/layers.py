"""Building blocks: axial position embeddings, the attention and chunked feed-forward sub-blocks, and the
chunked LM head + cross-entropy that never holds L x vocab logits.

Shapes: B batch, L length, D d_model, V vocabulary, K = 2*D (concatenated reversible streams).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reformer_dist.model.config import ReformerConfig
from reformer_dist.model.context import AttentionContext
from reformer_dist.model.local_attention import LocalSelfAttention
from reformer_dist.model.lsh_attention import LSHSelfAttention

IGNORE_INDEX = -100
_ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


class AxialPositionEmbedding(nn.Module):
    """E[p] = concat(rows[p // b], cols[p % b]) for axial_pos_shape (a, b): a*b positions from a+b vectors."""

    def __init__(self, cfg: ReformerConfig):
        super().__init__()
        a, b = cfg.axial_pos_shape
        d1, d2 = cfg.axial_pos_dims
        self.shape = (a, b)
        self.rows = nn.Parameter(torch.randn(a, d1) * cfg.axial_norm_std)
        self.cols = nn.Parameter(torch.randn(b, d2) * cfg.axial_norm_std)

    def forward(self, positions: Tensor) -> Tensor:
        b = self.shape[1]
        return torch.cat([self.rows[positions // b], self.cols[positions % b]], dim=-1)


class AttentionBlock(nn.Module):
    """F of the reversible pair: LayerNorm -> attention (lsh | local | full) -> output projection -> dropout."""

    def __init__(self, cfg: ReformerConfig, layer_idx: int):
        super().__init__()
        kind = cfg.attn_layers[layer_idx]
        self.kind = kind
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        if kind == "lsh":
            self.attn: nn.Module = LSHSelfAttention(cfg, layer_idx)
        else:
            self.attn = LocalSelfAttention(cfg, layer_idx, full=(kind == "full"))
        self.out = nn.Linear(cfg.n_heads * cfg.d_head, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, ctx: AttentionContext) -> Tensor:
        h = self.attn(self.norm(x.to(self.norm.weight.dtype)), ctx)
        return F.dropout(self.out(h), self.dropout, self.training)


class FeedForwardBlock(nn.Module):
    """G of the reversible pair: LayerNorm -> dense -> dropout -> activation -> dense -> dropout (HF order),
    applied to chunks of ``ff_chunk_len`` positions so d_ff-wide activations never exist for all of L."""

    def __init__(self, cfg: ReformerConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.dense = nn.Linear(cfg.d_model, cfg.d_ff)
        self.out = nn.Linear(cfg.d_ff, cfg.d_model)
        self.act = _ACTS[cfg.activation]
        self.dropout = cfg.dropout
        self.chunk_len = cfg.ff_chunk_len

    def chunks(self, length: int) -> list[tuple[int, int]]:
        step = self.chunk_len if self.chunk_len > 0 else length
        return [(s, min(s + step, length)) for s in range(0, length, step)]

    def forward_chunk(self, x: Tensor) -> Tensor:
        h = self.dense(self.norm(x.to(self.norm.weight.dtype)))
        h = self.act(F.dropout(h, self.dropout, self.training))
        return F.dropout(self.out(h), self.dropout, self.training)

    def forward(self, x: Tensor) -> Tensor:
        parts = [self.forward_chunk(x[:, s:e]) for s, e in self.chunks(x.shape[1])]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _acc_dtype(t: Tensor) -> torch.dtype:
    """Accumulate in fp32, or fp64 when the inputs are fp64 (parity tests)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy of ``hidden @ weight.T`` against labels, chunk by chunk; backward recomputes
    each chunk's logits, so peak memory is one chunk of logits instead of N x V."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int) -> Tensor:
        acc = _acc_dtype(hidden)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            logits = (hidden[s : s + chunk] @ weight.t()).to(acc)
            y = labels[s : s + chunk]
            valid = y != IGNORE_INDEX
            tgt = logits.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1)
            total += ((torch.logsumexp(logits, dim=-1) - tgt) * valid).sum()
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        hidden, weight, labels = ctx.saved_tensors
        g_hidden = torch.empty_like(hidden)
        acc = _acc_dtype(hidden)
        g_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s : s + ctx.chunk]
            y = labels[s : s + ctx.chunk]
            p = torch.softmax((h @ weight.t()).to(acc), dim=-1)
            valid = y != IGNORE_INDEX
            p[torch.arange(p.shape[0], device=p.device), y.clamp(min=0)] -= 1.0
            p *= (valid.to(p.dtype) * grad).unsqueeze(1)
            g_hidden[s : s + ctx.chunk] = (p.to(weight.dtype) @ weight).to(hidden.dtype)
            g_weight += p.t() @ h.to(acc)
        return g_hidden, g_weight.to(weight.dtype), None, None


class LMHead(nn.Module):
    """Final LayerNorm over the 2*D concatenated streams + bias-free projection to the vocabulary (HF layout).

    ``forward(h)`` gives logits; ``loss_sum(h, labels)`` gives the summed chunked cross-entropy. Both go
    through this module's forward so ZeRO-3 gathers its parameters.
    """

    def __init__(self, cfg: ReformerConfig):
        super().__init__()
        self.norm = nn.LayerNorm(2 * cfg.d_model, eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(2 * cfg.d_model, cfg.vocab_size, bias=False)
        self.dropout = cfg.dropout
        self.chunk_len = cfg.loss_chunk_len

    def forward(self, h: Tensor, labels: Tensor | None = None) -> Tensor:
        h = F.dropout(self.norm(h.to(self.norm.weight.dtype)), self.dropout, self.training)
        if labels is None:
            return self.proj(h)
        weight = self.proj.weight
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else weight.dtype
        with torch.autocast(h.device.type, enabled=False):
            return _ChunkedLinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]).to(dtype), weight.to(dtype),
                                                    labels.reshape(-1), self.chunk_len)
