"""Reversible residual stack: y1 = x1 + F(x2), y2 = x2 + G(y1), with inputs rebuilt in backward.

Layered like reformer-pytorch's reversible.py: RNG record/replay -> one autograd Function over the
whole stack -> ``ReformerStack`` with an ordinary (non-reversible) path over the same F and G, which
makes gradient parity testable. Activation memory does not grow with depth: the Function saves only
the two final streams. The streams are kept in fp32 whatever the compute dtype, because rebuilding
x = y - F(...) in bf16 drifts over many layers.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn

from reformer_dist.model.config import ReformerConfig
from reformer_dist.model.context import AttentionContext
from reformer_dist.model.layers import AttentionBlock, FeedForwardBlock

STREAM_DTYPE = torch.float32


class RNGState:
    """The CPU (and current CUDA device) RNG state at one point, so dropout can be replayed exactly."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.device = device
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replay(self):
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def _replay(state: RNGState | None):
    return state.replay() if state is not None else nullcontext()


class ReformerBlock(nn.Module):
    """One layer: F = attention sub-block, G = chunked feed-forward sub-block."""

    def __init__(self, cfg: ReformerConfig, layer_idx: int):
        super().__init__()
        self.f = AttentionBlock(cfg, layer_idx)
        self.g = FeedForwardBlock(cfg)


class _ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1: Tensor, x2: Tensor, blocks: nn.ModuleList, actx: AttentionContext, record_rng: bool):
        device = x1.device
        states = []
        with torch.no_grad():
            for blk in blocks:
                s_f = RNGState(device) if record_rng else None
                x1 = x1 + blk.f(x2, actx).to(STREAM_DTYPE)
                s_g = RNGState(device) if record_rng else None
                x2 = x2 + blk.g(x1).to(STREAM_DTYPE)
                states.append((s_f, s_g))
        ctx.blocks, ctx.actx, ctx.states = blocks, actx, states
        ctx.autocast = (device.type, torch.is_autocast_enabled(device.type),
                        torch.get_autocast_dtype(device.type))
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    def backward(ctx, dy1: Tensor, dy2: Tensor):
        y1, y2 = ctx.saved_tensors
        dev_type, ac_on, ac_dtype = ctx.autocast
        autocast = torch.autocast(dev_type, dtype=ac_dtype, enabled=ac_on)
        for blk, (s_f, s_g) in zip(reversed(ctx.blocks), reversed(ctx.states)):
            # G is position-wise: recompute and backpropagate it chunk by chunk (bounded d_ff memory).
            g_out, dy1_parts = [], []
            with _replay(s_g), autocast:
                for s, e in blk.g.chunks(y1.shape[1]):
                    with torch.enable_grad():
                        y1c = y1[:, s:e].detach().requires_grad_(True)
                        gc = blk.g.forward_chunk(y1c).to(STREAM_DTYPE)
                        torch.autograd.backward(gc, dy2[:, s:e])
                    g_out.append(gc.detach())
                    dy1_parts.append(y1c.grad)
            with torch.no_grad():
                x2 = y2 - torch.cat(g_out, dim=1)
                dy1 = dy1 + torch.cat(dy1_parts, dim=1)
            del g_out, dy1_parts
            with _replay(s_f), autocast, torch.enable_grad():
                x2c = x2.detach().requires_grad_(True)
                fo = blk.f(x2c, ctx.actx).to(STREAM_DTYPE)
                torch.autograd.backward(fo, dy1)
            with torch.no_grad():
                x1 = y1 - fo.detach()
                dy2 = dy2 + x2c.grad
            del fo, x2c
            y1, y2 = x1, x2
        return dy1, dy2, None, None, None


class ReformerStack(nn.Module):
    """All layers; ``reversible`` picks the memory-saving Function or ordinary autograd over the same blocks."""

    def __init__(self, cfg: ReformerConfig):
        super().__init__()
        self.blocks = nn.ModuleList(ReformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.reversible = cfg.reversible
        self.record_rng = cfg.dropout > 0

    def forward(self, x1: Tensor, x2: Tensor, actx: AttentionContext) -> tuple[Tensor, Tensor]:
        x1, x2 = x1.to(STREAM_DTYPE), x2.to(STREAM_DTYPE)
        if self.reversible and torch.is_grad_enabled() and (x1.requires_grad or x2.requires_grad):
            return _ReversibleFunction.apply(x1, x2, self.blocks, actx, self.record_rng and self.training)
        for blk in self.blocks:
            x1 = x1 + blk.f(x2, actx).to(STREAM_DTYPE)
            x2 = x2 + blk.g(x1).to(STREAM_DTYPE)
        return x1, x2
