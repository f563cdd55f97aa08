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
from reformer_dist.model.head_groups import HeadLinear
from reformer_dist.model.local_attention import LocalSelfAttention
from reformer_dist.model.lsh_attention import LSHSelfAttention
from reformer_dist.model.rng import RNGState, replay

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


def _dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout that is the identity (no op, nothing saved) when it cannot drop anything."""
    return F.dropout(x, p, training) if p > 0 and training else x


class _NormRecompute:
    """Saved-tensor hooks that keep a LayerNorm output as a recipe instead of its values.

    The projections after the norm save its output for their weight gradients (one [B, L, D] tensor per
    layer held through the attention backward). The recipe is the norm's input, which LayerNorm saves
    anyway, plus a copy of its affine parameters (taken now, while ZeRO-3 has them gathered); the
    output is rebuilt, elementwise and cheaply, when a backward unpacks it.
    """

    def __init__(self, x: Tensor, xn: Tensor, norm: nn.LayerNorm):
        self.x, self.key, self.dtype, self.eps = x, xn.untyped_storage().data_ptr(), xn.dtype, norm.eps
        self.weight, self.bias = norm.weight.detach().clone(), norm.bias.detach().clone()

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: Tensor):
        if t.untyped_storage().data_ptr() != self.key:
            return t
        return (t.size(), t.stride(), t.storage_offset())

    def _unpack(self, packed):
        if isinstance(packed, Tensor):
            return packed
        xn = F.layer_norm(self.x, self.weight.shape, self.weight, self.bias, self.eps).to(self.dtype)
        return xn.as_strided(*packed)


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
        self.out = HeadLinear(cfg.n_heads * cfg.d_head, cfg.d_model, cfg.d_head, heads_in=True)
        self.dropout = cfg.dropout

    def normed(self, x: Tensor) -> Tensor:
        """LayerNorm(x), in the autocast dtype when autocast is on."""
        xn = self.norm(x.to(self.norm.weight.dtype))
        if torch.is_autocast_enabled(xn.device.type):
            # cast once: autocast would make (and each projection's backward keep) a copy per projection
            xn = xn.to(torch.get_autocast_dtype(xn.device.type))
        return xn

    def forward(self, x: Tensor, ctx: AttentionContext) -> Tensor:
        """F(x) with all heads at once (``model.head_groups``: the reversible stack's grouped path is
        ``head_groups.add_forward`` / ``head_groups.backward``)."""
        x = x.to(self.norm.weight.dtype)
        xn = self.normed(x)
        with _NormRecompute(x, xn, self.norm).hooks():
            h = self.attn(xn, ctx)
        return _dropout(self.out(h), self.dropout, self.training)


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
        h = self.act(_dropout(h, self.dropout, self.training))
        return _dropout(self.out(h), self.dropout, self.training)

    def forward(self, x: Tensor) -> Tensor:
        parts = [self.forward_chunk(x[:, s:e]) for s, e in self.chunks(x.shape[1])]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _acc_dtype(t: Tensor) -> torch.dtype:
    """Accumulate in fp32, or fp64 when the inputs are fp64 (parity tests)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class _ChunkedHeadLoss(torch.autograd.Function):
    """Summed cross-entropy of ``proj(dropout(LayerNorm(cat(x1, x2))))`` against labels, chunk by chunk.

    Saves only the two streams (which the reversible stack keeps anyway) and the labels: neither the
    concatenation, its normalisation nor any logits exist for the whole sequence. Backward recomputes
    each chunk (replaying the dropout RNG) and backpropagates it on its own.
    """

    @staticmethod
    def forward(ctx, x1: Tensor, x2: Tensor, norm_w: Tensor, norm_b: Tensor, weight: Tensor, labels: Tensor,
                head: "LMHead", dtype: torch.dtype, rng: RNGState | None) -> Tensor:
        total = torch.zeros((), dtype=_acc_dtype(x1), device=x1.device)
        with torch.autocast(x1.device.type, enabled=False), replay(rng):
            for s, e in head.chunks(x1.shape[0]):
                logits = head.chunk_logits(x1[s:e], x2[s:e], norm_w, norm_b, weight, dtype)
                total += F.cross_entropy(logits, labels[s:e], ignore_index=IGNORE_INDEX, reduction="sum")
        ctx.save_for_backward(x1, x2, norm_w, norm_b, weight, labels)
        ctx.head, ctx.dtype, ctx.rng = head, dtype, rng
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        x1, x2, norm_w, norm_b, weight, labels = ctx.saved_tensors
        head, dtype = ctx.head, ctx.dtype
        g1, g2 = torch.empty_like(x1), torch.empty_like(x2)
        params = [t.detach().requires_grad_(True) for t in (norm_w, norm_b, weight)]
        with torch.autocast(x1.device.type, enabled=False), replay(ctx.rng):
            for s, e in head.chunks(x1.shape[0]):
                with torch.enable_grad():
                    c1, c2 = x1[s:e].detach().requires_grad_(True), x2[s:e].detach().requires_grad_(True)
                    logits = head.chunk_logits(c1, c2, *params, dtype)
                    loss = F.cross_entropy(logits, labels[s:e], ignore_index=IGNORE_INDEX, reduction="sum")
                torch.autograd.backward(loss, grad)
                g1[s:e], g2[s:e] = c1.grad, c2.grad
        return (g1, g2, *(p.grad for p in params), None, None, None, None)


class LMHead(nn.Module):
    """Final LayerNorm over the 2*D concatenated streams + bias-free projection to the vocabulary (HF layout).

    ``forward(x1, x2)`` gives logits; ``forward(x1, x2, labels)`` the summed cross-entropy, chunk by chunk
    (``loss_chunk_len`` tokens), without ever building the concatenation or the L x V logits;
    ``forward(x1, x2, labels, per_token=True)`` each token's loss and prediction (evaluation). All go
    through this module's forward so ZeRO-3 gathers its parameters.
    """

    def __init__(self, cfg: ReformerConfig):
        super().__init__()
        self.norm = nn.LayerNorm(2 * cfg.d_model, eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(2 * cfg.d_model, cfg.vocab_size, bias=False)
        self.dropout = cfg.dropout
        self.chunk_len = cfg.loss_chunk_len

    def chunks(self, n: int) -> list[tuple[int, int]]:
        return [(s, min(s + self.chunk_len, n)) for s in range(0, n, self.chunk_len)]

    def chunk_logits(self, x1: Tensor, x2: Tensor, norm_w: Tensor, norm_b: Tensor, weight: Tensor,
                     dtype: torch.dtype) -> Tensor:
        """Logits (accumulation dtype) of one chunk of positions [N, D] x 2, matmul in ``dtype``."""
        h = F.layer_norm(torch.cat([x1, x2], dim=-1).to(norm_w.dtype), norm_w.shape, norm_w, norm_b, self.norm.eps)
        h = _dropout(h, self.dropout, self.training)
        return (h.to(dtype) @ weight.to(dtype).t()).to(_acc_dtype(x1))

    @torch.no_grad()
    def _token_scores(self, x1: Tensor, x2: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token cross-entropy [N] (accumulation dtype, 0 where labels = -100) and the argmax prediction [N]
        of streams [N, D] x 2, chunk by chunk like the summed loss (no N x V logits; evaluation only)."""
        device = x1.device.type
        weight = self.proj.weight
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        losses = torch.empty(x1.shape[0], dtype=_acc_dtype(x1), device=x1.device)
        preds = torch.empty(x1.shape[0], dtype=torch.long, device=x1.device)
        with torch.autocast(device, enabled=False):
            for s, e in self.chunks(x1.shape[0]):
                logits = self.chunk_logits(x1[s:e], x2[s:e], self.norm.weight, self.norm.bias, weight, dtype)
                losses[s:e] = F.cross_entropy(logits, labels[s:e], ignore_index=IGNORE_INDEX, reduction="none")
                preds[s:e] = logits.argmax(-1)
        return losses, preds

    def forward(self, x1: Tensor, x2: Tensor, labels: Tensor | None = None, per_token: bool = False):
        """Logits; with labels the summed loss, or with ``per_token`` (labels [N], streams [N, D]) each token's
        loss and argmax prediction (``_token_scores``)."""
        if per_token:
            return self._token_scores(x1, x2, labels)
        if labels is None:
            h = self.norm(torch.cat([x1, x2], dim=-1).to(self.norm.weight.dtype))
            return self.proj(_dropout(h, self.dropout, self.training))
        device = x1.device.type
        weight = self.proj.weight
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        rng = RNGState(x1.device) if self.dropout > 0 and self.training else None
        d = x1.shape[-1]
        return _ChunkedHeadLoss.apply(x1.reshape(-1, d), x2.reshape(-1, d), self.norm.weight, self.norm.bias, weight,
                                      labels.reshape(-1), self, dtype, rng)
