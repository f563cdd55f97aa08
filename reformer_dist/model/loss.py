"""The language-model loss: the LM head and its chunked cross-entropy, which never holds L x vocab logits.

``IGNORE_INDEX`` is the label of a position that is not scored (padding, the last position's missing
target, an evaluation's context); every loss and count in the package uses it. Losses accumulate in the
accumulation dtype (``kernels.logits.acc_dtype``: fp32, fp64 for fp64 parity tests).

Shapes: N tokens (batch and length flattened), D d_model, V vocabulary; the head sees the two streams'
concatenation (2*D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reformer_dist.kernels.logits import acc_dtype
from reformer_dist.model.config import ReformerConfig
from reformer_dist.model.rng import RNGState, dropout, replay

IGNORE_INDEX = -100  # torch's cross-entropy default, and HF's


class _ChunkedHeadLoss(torch.autograd.Function):
    """Summed cross-entropy of ``proj(dropout(LayerNorm(cat(x1, x2))))`` against labels, chunk by chunk.

    Saves only the two streams (which the reversible stack keeps anyway) and the labels: neither the
    concatenation, its normalisation nor any logits exist for the whole sequence. Backward recomputes
    each chunk (replaying the dropout RNG) and backpropagates it on its own.
    """

    @staticmethod
    def forward(
        ctx,
        x1: Tensor,
        x2: Tensor,
        norm_w: Tensor,
        norm_b: Tensor,
        weight: Tensor,
        labels: Tensor,
        head: "LMHead",
        dtype: torch.dtype,
        rng: RNGState | None,
    ) -> Tensor:
        total = torch.zeros((), dtype=acc_dtype(x1), device=x1.device)
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

    def chunk_logits(
        self, x1: Tensor, x2: Tensor, norm_w: Tensor, norm_b: Tensor, weight: Tensor, dtype: torch.dtype
    ) -> Tensor:
        """Logits (accumulation dtype) of one chunk of positions [N, D] x 2, matmul in ``dtype``."""
        h = F.layer_norm(torch.cat([x1, x2], dim=-1).to(norm_w.dtype), norm_w.shape, norm_w, norm_b, self.norm.eps)
        h = dropout(h, self.dropout, self.training)
        return (h.to(dtype) @ weight.to(dtype).t()).to(acc_dtype(x1))

    @torch.no_grad()
    def _token_scores(self, x1: Tensor, x2: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token cross-entropy [N] (accumulation dtype, 0 where labels = IGNORE_INDEX) and the argmax prediction [N]
        of streams [N, D] x 2, chunk by chunk like the summed loss (no N x V logits; evaluation only)."""
        device = x1.device.type
        weight = self.proj.weight
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        losses = torch.empty(x1.shape[0], dtype=acc_dtype(x1), device=x1.device)
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
            assert labels is not None, "per_token scores need labels"
            return self._token_scores(x1, x2, labels)
        if labels is None:
            h = self.norm(torch.cat([x1, x2], dim=-1).to(self.norm.weight.dtype))
            return self.proj(dropout(h, self.dropout, self.training))
        device = x1.device.type
        weight = self.proj.weight
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        rng = RNGState(x1.device) if self.dropout > 0 and self.training else None
        d = x1.shape[-1]
        return _ChunkedHeadLoss.apply(
            x1.reshape(-1, d),
            x2.reshape(-1, d),
            self.norm.weight,
            self.norm.bias,
            weight,
            labels.reshape(-1),
            self,
            dtype,
            rng,
        )
