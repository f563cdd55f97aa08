"""The autograd Function the memory-lean cores share (blockwise PyTorch, Triton).

It saves only the contract's inputs (q, k, v, index and the masks) and the outputs (out, lse as hi + lo),
runs the core's own forward and backward with autocast off (a core fixes its own precision), and hands the
backward a gradient for ``out`` even when only ``lse`` was used.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor


class CoreInputs(NamedTuple):
    """The tensors of one ``chunked_attention`` call (see its contract)."""

    q: Tensor
    k: Tensor | None
    v: Tensor
    index: Tensor | None  # type: ignore[assignment]  # a field, shadowing tuple.index
    key_valid: Tensor | None
    slot_bucket: Tensor | None
    document_ids: Tensor | None
    positions: Tensor | None
    chunk_of: Tensor | None


class LeanCore(Protocol):
    """A core's plan for one call (sizes and options), with its forward and its backward."""

    def forward(self, x: CoreInputs) -> tuple[Tensor, Tensor, Tensor]:
        """(out [B, L, H, D], lse hi, lse lo [B, L, H])."""

    def backward(
        self, x: CoreInputs, out: Tensor, lse: Tensor, lse_lo: Tensor, dout: Tensor, dlse: Tensor | None
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """(dq, dk or None for shared QK, dv)."""


class _LeanAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, core: LeanCore, *tensors: Tensor | None):
        ctx.set_materialize_grads(False)
        x = CoreInputs(*tensors)  # type: ignore[arg-type]  # q and v are never None
        with torch.autocast(x.q.device.type, enabled=False):
            out, lse, lse_lo = core.forward(x)
        ctx.save_for_backward(*x, out, lse, lse_lo)
        ctx.core = core
        ctx.mark_non_differentiable(lse_lo)
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor | None, dlse: Tensor | None):
        *tensors, out, lse, lse_lo = ctx.saved_tensors
        if dout is None and dlse is None:
            return (None,) * (1 + len(CoreInputs._fields))
        x = CoreInputs(*tensors)
        with torch.autocast(x.q.device.type, enabled=False):
            dq, dk, dv = ctx.core.backward(x, out, lse, lse_lo, torch.zeros_like(out) if dout is None else dout, dlse)
        return (None, dq, dk, dv) + (None,) * (len(CoreInputs._fields) - 3)


def apply_lean(core: LeanCore, x: CoreInputs) -> tuple[Tensor, Tensor]:
    """(out, lse) of a lean core, differentiable in q, k and v."""
    return _LeanAttention.apply(core, *x)
