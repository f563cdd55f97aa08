"""Reversible residual stack: y1 = x1 + F(x2), y2 = x2 + G(y1), with inputs rebuilt in backward.

Layered like reformer-pytorch's reversible.py: RNG record/replay -> one autograd Function over the
whole stack -> ``ReformerStack`` with an ordinary (non-reversible) path over the same F and G, which
makes gradient parity testable. Activation memory does not grow with depth: the Function saves only
the two final streams, and its backward works in place on them: x2 = y2 - G(y1) and x1 = y1 - F(x2) are
rebuilt into the same buffers, the stream gradients are accumulated in place, G is recomputed and
backpropagated chunk by chunk, and F's output is freed before F's backward runs (its gradient edge is
all the backward needs). With ``model.head_groups`` G > 1 (by default at long sequences), F runs forward,
recompute and backward one head group at a time (``head_groups.py``). The streams are kept in fp32
whatever the compute dtype (the accumulation dtype, ``kernels.logits.acc_dtype``: fp64 models keep fp64), because
rebuilding x = y - F(...) in bf16 drifts over many layers.
"""

from typing import Iterable, cast

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from reformer_dist.kernels.logits import acc_dtype
from reformer_dist.model import head_groups
from reformer_dist.model.blocks import AttentionBlock, FeedForwardBlock
from reformer_dist.model.config import ReformerConfig
from reformer_dist.model.context import AttentionContext
from reformer_dist.model.rng import RNGState, replay


class ReformerBlock(nn.Module):
    """One layer: F = attention sub-block, G = chunked feed-forward sub-block."""

    def __init__(self, cfg: ReformerConfig, layer_idx: int):
        super().__init__()
        self.f = AttentionBlock(cfg, layer_idx)
        self.g = FeedForwardBlock(cfg)


def _own(grad: Tensor | None, like: Tensor) -> Tensor:
    """A contiguous gradient buffer for a stream, that this backward may update in place."""
    if grad is None:
        return torch.zeros_like(like)
    return grad if grad.is_contiguous() and grad.dtype == like.dtype else grad.to(like.dtype).contiguous()


class _ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x1: Tensor, x2: Tensor, blocks: nn.ModuleList, actx: AttentionContext, record_rng: bool, groups: int
    ):
        device = x1.device
        states = []
        with torch.no_grad():
            # own buffers (the caller passes the embeddings twice), updated in place layer after layer
            y1 = x1.to(acc_dtype(x1), copy=True)
            y2 = x2.to(acc_dtype(x2), copy=True)
            for blk in cast("Iterable[ReformerBlock]", blocks):  # an nn.ModuleList is typed as yielding nn.Module
                s_f = RNGState(device) if record_rng else None
                if groups == 1:
                    y1.add_(blk.f(y2, actx))
                else:  # one head group at a time (head_groups.py), undone in the same groups in backward
                    head_groups.add_forward(blk.f, y2, actx, groups, y1)
                s_g = RNGState(device) if record_rng else None
                for s, e in blk.g.chunks(y1.shape[1]):
                    y2[:, s:e].add_(blk.g.forward_chunk(y1[:, s:e]))
                states.append((s_f, s_g))
        ctx.blocks, ctx.actx, ctx.states, ctx.consumed, ctx.groups = blocks, actx, states, False, groups
        ctx.autocast = (device.type, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        ctx.save_for_backward(y1, y2)
        return y1, y2

    @staticmethod
    def backward(ctx, dy1: Tensor | None, dy2: Tensor | None):
        if ctx.consumed:
            raise RuntimeError(
                "the reversible stack's backward rebuilds its inputs in place and can run only once "
                "(retain_graph is not supported)"
            )
        ctx.consumed = True
        y1, y2 = ctx.saved_tensors  # rebuilt into x1, x2 in place, layer by layer
        dy1, dy2 = _own(dy1, y1), _own(dy2, y2)
        dev_type, ac_on, ac_dtype = ctx.autocast
        autocast = torch.autocast(dev_type, dtype=ac_dtype, enabled=ac_on)
        for blk, (s_f, s_g) in zip(reversed(ctx.blocks), reversed(ctx.states)):
            # G is position-wise: recompute and backpropagate it chunk by chunk (bounded d_ff memory),
            # rebuilding x2 = y2 - G(y1) and accumulating dy1 += dG^T dy2 in place.
            # (backward passes run outside autocast: it applies to the recomputed forward only)
            with replay(s_g):
                for s, e in blk.g.chunks(y1.shape[1]):
                    with autocast, torch.enable_grad():
                        y1c = y1[:, s:e].detach().requires_grad_(True)
                        gc = blk.g.forward_chunk(y1c).to(y2.dtype)
                    torch.autograd.backward(gc, dy2[:, s:e])
                    with torch.no_grad():
                        y2[:, s:e].sub_(gc)
                        dy1[:, s:e].add_(y1c.grad)
                    del gc, y1c
            if ctx.groups > 1:  # rebuild x1 and backpropagate F one head group at a time (head_groups.py)
                with replay(s_f):
                    head_groups.backward(blk.f, y2, y1, dy1, dy2, ctx.actx, ctx.groups, autocast)
                continue
            with replay(s_f), autocast, torch.enable_grad():
                x2c = y2.detach().requires_grad_(True)
                fo = blk.f(x2c, ctx.actx).to(y1.dtype)
            with torch.no_grad():
                y1.sub_(fo)  # x1 rebuilt before F's backward, so F's output need not stay alive during it
            edge = get_gradient_edge(fo)  # what backward needs of fo; its values are freed now
            del fo
            torch.autograd.backward(edge, dy1)
            with torch.no_grad():
                dy2.add_(x2c.grad)
            del edge, x2c
        return dy1, dy2, None, None, None, None


class ReformerStack(nn.Module):
    """All layers; ``reversible`` picks the memory-saving Function or ordinary autograd over the same blocks."""

    def __init__(self, cfg: ReformerConfig):
        super().__init__()
        self.blocks = nn.ModuleList(ReformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.cfg = cfg
        self.reversible = cfg.reversible
        self.record_rng = cfg.dropout > 0

    def forward(self, x1: Tensor, x2: Tensor, actx: AttentionContext) -> tuple[Tensor, Tensor]:
        x1, x2 = x1.to(acc_dtype(x1)), x2.to(acc_dtype(x2))
        if self.reversible and torch.is_grad_enabled() and (x1.requires_grad or x2.requires_grad):
            groups = head_groups.stack_groups(self.cfg, x1.shape[1], actx)
            return _ReversibleFunction.apply(x1, x2, self.blocks, actx, self.record_rng and self.training, groups)
        for blk in cast("Iterable[ReformerBlock]", self.blocks):
            x1 = x1 + blk.f(x2, actx).to(x1.dtype)
            x2 = x2 + blk.g(x1).to(x2.dtype)
        return x1, x2
