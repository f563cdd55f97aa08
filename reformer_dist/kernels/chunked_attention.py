"""The kernel boundary: one function that LSH, local and short-sequence attention all call.

``chunked_attention(q, k, v, pos, ...) -> (out, lse)`` takes sorted, chunked queries/keys/values plus the
original position of every slot, and returns each query's output and the log-sum-exp of its logits.
Implementations are interchangeable: the PyTorch reference (plain autograd, the test oracle), the
blockwise PyTorch core (own backward, O(L*D) memory, any device) and fused GPU kernels registered here.
``backend="auto"`` picks a fused kernel on CUDA when one is registered and supports the call, else the
blockwise core (or the reference when all logits fit in one block).
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from reformer_dist.kernels import blockwise
from reformer_dist.kernels.blockwise import chunked_attention_blockwise
from reformer_dist.kernels.reference import chunked_attention_reference

AttentionCore = Callable[..., tuple[Tensor, Tensor]]

# name -> (implementation, predicate(q, **kwargs) -> bool saying whether it supports this call)
_BACKENDS: dict[str, tuple[AttentionCore, Callable[..., bool]]] = {
    "reference": (chunked_attention_reference, lambda q, **kw: True),
    "blockwise": (chunked_attention_blockwise, lambda q, **kw: True),
}
_PORTABLE = ("reference", "blockwise")


def register_backend(name: str, fn: AttentionCore, supports: Callable[..., bool]) -> None:
    """Make a fused implementation available to ``backend="auto"`` (tried before the reference)."""
    _BACKENDS[name] = (fn, supports)


def available_backends() -> list[str]:
    return list(_BACKENDS)


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, *, backend: str = "auto", **kwargs) -> tuple[Tensor, Tensor]:
    """Dispatch to a backend; see ``chunked_attention_reference`` for the arguments and semantics."""
    if backend == "auto":
        if q.is_cuda:
            for name, (fn, supports) in _BACKENDS.items():
                if name not in _PORTABLE and supports(q, **kwargs):
                    return fn(q, k, v, pos, **kwargs)
        # Blockwise keeps activation memory O(L*D) at the price of one more logits pass in backward; when
        # all logits fit in one of its blocks, plain autograd holds no more than blockwise would at peak.
        b, h, n, m = q.shape[:4]
        window = (1 + kwargs.get("n_before", 0) + kwargs.get("n_after", 0)) * m
        backend = "reference" if b * h * n * m * window <= blockwise.block_elems() else "blockwise"
    if backend not in _BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; available: {available_backends()}")
    return _BACKENDS[backend][0](q, k, v, pos, **kwargs)
