"""The two sub-blocks of a reversible layer: F = attention (``AttentionBlock``) and G = chunked feed-forward
(``FeedForwardBlock``), with the LayerNorm-output recipe the attention block's backward uses.

Shapes: B batch, L length, D d_model.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reformer_dist.model.config import ReformerConfig
from reformer_dist.model.context import AttentionContext
from reformer_dist.model.head_groups import HeadLinear
from reformer_dist.model.local_attention import LocalSelfAttention
from reformer_dist.model.lsh_attention import LSHSelfAttention
from reformer_dist.model.rng import dropout

_ACTS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


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
            self.attn: LSHSelfAttention | LocalSelfAttention = LSHSelfAttention(cfg, layer_idx)
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
        return dropout(self.out(h), self.dropout, self.training)


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
        h = self.act(dropout(h, self.dropout, self.training))
        return dropout(self.out(h), self.dropout, self.training)

    def forward(self, x: Tensor) -> Tensor:
        parts = [self.forward_chunk(x[:, s:e]) for s, e in self.chunks(x.shape[1])]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
