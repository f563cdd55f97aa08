"""The attention block one head group at a time: the reversible stack's forward, recompute and backward.

Heads are independent until the output projection, which sums their contributions:
F(x) = dropout(sum_g out_g(attend_g(proj_g(LayerNorm(x))))) with proj_g the rows of the input projections and
out_g the columns of the output projection that belong to the heads of group g. With G groups
(``model.head_groups``) the reversible forward adds each group's share to the fp32 stream in turn, and the
backward subtracts them again in reverse order while back-propagating each group on its own: only one group's
qk, v, output, output gradient, d(qk) and d(v) exist at a time (6 c d / G bytes per token instead of 6 c d).
The projections and the output projection run over chunks of ``ff_chunk_len`` tokens, so neither the
LayerNorm output, its gradient, the input gradient nor a group's full-width output exist for all of L; each
chunk's input gradient is added to the stream gradient as soon as it is ready.

Numerics: hash rotations are drawn for all heads and sliced per group (``AttentionContext.head_offset``), so
every head hashes, sorts and attends exactly as without groups. Only the sums over heads change order: the
output projection (a sum of G partial products) and the input gradient (a sum of G groups' projections'
gradients). Results equal the ungrouped model's up to float rounding; G = 1 is the ungrouped code path
(``AttentionBlock.forward``). A dropout mask is drawn once per layer for the whole output, as without groups.

Every parameter is used through its module's ``__call__`` (``HeadLinear`` slices inside its forward), so
ZeRO-3 gathers weights as it does for the whole layer.
"""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from reformer_dist.model.blocks import AttentionBlock
    from reformer_dist.model.config import ReformerConfig
    from reformer_dist.model.context import AttentionContext


class HeadLinear(nn.Linear):
    """Bias-free ``nn.Linear`` that can use only the weights of a range of heads: the rows of a projection to
    heads (``heads_in=False``) or the columns of the projection from heads (``heads_in=True``).

    Same parameter and state-dict key as ``nn.Linear``; the slice is taken in ``forward`` so hooks that gather
    or track the weight (ZeRO-3) see an ordinary call.
    """

    def __init__(self, in_features: int, out_features: int, d_head: int, heads_in: bool):
        super().__init__(in_features, out_features, bias=False)
        self.d_head, self.heads_in = d_head, heads_in

    def forward(self, x: Tensor, heads: tuple[int, int] | None = None) -> Tensor:
        """``x @ W.T``, or with ``heads=(first, end)`` the part of it that those heads compute or receive."""
        if heads is None:
            return super().forward(x)
        a, b = heads[0] * self.d_head, heads[1] * self.d_head
        return F.linear(x, self.weight[:, a:b] if self.heads_in else self.weight[a:b])


def group_ranges(n_heads: int, groups: int) -> list[tuple[int, int]]:
    """(first head, end) of each of ``groups`` equal groups of consecutive heads."""
    per = n_heads // groups
    return [(g * per, (g + 1) * per) for g in range(groups)]


def stack_groups(cfg: "ReformerConfig", local_tokens: int, actx: "AttentionContext") -> int:
    """Head groups for a reversible step over ``local_tokens`` tokens of this rank (``cfg.head_groups_for`` of
    the whole sequence, with the heads split over the Ulysses ranks of ``actx.sequence_parallel``)."""
    sp = actx.sequence_parallel
    size = 1 if sp is None else sp.size
    ulysses = 1 if sp is None else sp.ulysses_size
    return cfg.head_groups_for(local_tokens * size, ulysses)


def _chunks(length: int, step: int) -> list[tuple[int, int]]:
    step = step if step > 0 else length
    return [(s, min(s + step, length)) for s in range(0, length, step)]


def _dropout_scale(block: "AttentionBlock", x: Tensor) -> Tensor | None:
    """The block's dropout mask times 1/(1-p) for its [B, L, D] output (one draw, as ``F.dropout`` of the
    ungrouped output makes), in the output's dtype; None without dropout."""
    if not (block.dropout > 0 and block.training):
        return None
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else block.out.weight.dtype
    return F.dropout(torch.ones(*x.shape[:2], block.out.out_features, dtype=dtype, device=x.device), block.dropout)


def _project(
    block: "AttentionBlock", x: Tensor, heads: tuple[int, int], chunk: int, into: Tensor | None = None
) -> list[Tensor]:
    """The group's projections of LayerNorm(x), [B, L, Hg, Dh] each, computed over chunks of tokens.

    With ``into`` (the stream gradient) the chunks are differentiable: each chunk of x is a leaf whose gradient
    is added to ``into`` in place when the backward reaches it, and the LayerNorm outputs are recipes, not
    values (``blocks._NormRecompute``).
    """
    from reformer_dist.model.blocks import _NormRecompute  # here: blocks imports this module (HeadLinear)

    b, length, _ = x.shape
    hg, dh = heads[1] - heads[0], block.attn.cfg.d_head
    outs = []
    for proj in block.attn.projections():
        pieces = []
        for s, e in _chunks(length, chunk):
            xc = x[:, s:e]
            if into is not None:
                xc = xc.detach().requires_grad_(True)
                xc.register_post_accumulate_grad_hook(_adder(into, s, e))
            xn = block.normed(xc)
            if into is None:
                pieces.append(proj(xn, heads).view(b, e - s, hg, dh))
            else:
                with _NormRecompute(xc, xn, block.norm).hooks():
                    pieces.append(proj(xn, heads).view(b, e - s, hg, dh))
            del xn
        outs.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1))
        del pieces  # the concatenation does not keep them
    return outs


def _adder(into: Tensor, s: int, e: int):
    def hook(leaf: Tensor) -> None:
        assert leaf.grad is not None  # a post-accumulate-grad hook: the gradient is there
        with torch.no_grad():
            into[:, s:e].add_(leaf.grad)
        leaf.grad = None

    return hook


def _attend(block: "AttentionBlock", tensors: list[Tensor], actx: "AttentionContext", heads: tuple[int, int]) -> Tensor:
    """The group's attention output [B, L, Hg, Dh]: rotations and Ulysses offsets follow the global head index."""
    ctx = dataclasses.replace(actx, head_offset=actx.head_offset + heads[0])
    return ctx.attend(block.attn.attend, *tensors)


def _out_chunk(
    block: "AttentionBlock", h: Tensor, heads: tuple[int, int], scale: Tensor | None, dtype: torch.dtype
) -> Tensor:
    """The group's share of the block output for a chunk of tokens, h [B, n, Hg, Dh] -> [B, n, D] in ``dtype``."""
    f = block.out(h.reshape(*h.shape[:2], -1), heads)
    if scale is not None:
        f = f * scale
    return f.to(dtype)


def add_forward(block: "AttentionBlock", x: Tensor, actx: "AttentionContext", groups: int, y: Tensor) -> None:
    """``y += F(x)`` one head group at a time (the reversible forward; no autograd graph)."""
    scale = _dropout_scale(block, x)
    chunk = block.attn.cfg.ff_chunk_len
    with torch.no_grad():
        for heads in group_ranges(block.attn.cfg.n_heads, groups):
            h = _attend(block, _project(block, x, heads, chunk), actx, heads)
            for s, e in _chunks(x.shape[1], chunk):
                y[:, s:e].add_(_out_chunk(block, h[:, s:e], heads, None if scale is None else scale[:, s:e], y.dtype))
            del h


def backward(
    block: "AttentionBlock",
    x: Tensor,
    y: Tensor,
    dy: Tensor,
    dx: Tensor,
    actx: "AttentionContext",
    groups: int,
    autocast: AbstractContextManager,
) -> None:
    """Undo ``add_forward`` and back-propagate through it, one head group at a time, in place.

    x: the block's input (rebuilt stream); y: the stream F was added to, rebuilt into its input in place;
    dy: the gradient of y (read); dx: the gradient of x (accumulated in place). Parameter gradients accumulate.
    Run it under the RNG state of the forward (``rng.replay``) when there is dropout; ``autocast`` is the
    forward's autocast, applied to recomputation only.
    """
    with autocast:
        scale = _dropout_scale(block, x)
    chunk = block.attn.cfg.ff_chunk_len
    for heads in reversed(group_ranges(block.attn.cfg.n_heads, groups)):  # undo the forward's sum in reverse
        with autocast, torch.enable_grad():
            h = _attend(block, _project(block, x, heads, chunk, into=dx), actx, heads)
        dh = torch.empty_like(h)
        for s, e in _chunks(x.shape[1], chunk):
            with autocast, torch.enable_grad():
                hc = h[:, s:e].detach().requires_grad_(True)
                f = _out_chunk(block, hc, heads, None if scale is None else scale[:, s:e], y.dtype)
            with torch.no_grad():
                y[:, s:e].sub_(f)
            torch.autograd.backward(f, dy[:, s:e])
            assert hc.grad is not None  # hc is a leaf that f was computed from
            dh[:, s:e] = hc.grad
            del f, hc
        # through the core into the group's projections; their chunks add into dx as they finish
        torch.autograd.backward(h, dh)
        del h, dh
