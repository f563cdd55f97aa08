"""The kernel boundary: one contract that LSH, local and short-sequence attention all call.

``chunked_attention(q, k, v, index, ...) -> (out, lse)``

- q, v: [B, L, H, D] in the natural layout of the projections (no transposed copies). k: [B, L, H, D],
  or None for shared-QK attention, whose keys are ``normalize_keys(q)`` and whose key gradient flows
  into q. Separate keys are scaled by 1/sqrt(D).
- index: [B, H, S] integer, S = R*L: the row of q/k/v (the original position) held by sorted slot s.
  Slots form R rounds of L consecutive slots, each round a permutation of 0..L-1 (LSH: the stable sort by
  (bucket, position)). None = the identity (one round: local attention).
- The S slots are cut into chunks of ``chunk_len``; each chunk's queries attend to the keys of the
  chunk itself, ``n_chunks_before`` chunks before and ``n_chunks_after`` after, wrapping over all S slots (HF/trax).
  Keys and values are read from the unsorted tensors through ``index``: no sorted copies exist.
- Masks (``logits.masked_logits``): causal (key position <= query position), ``key_valid`` [B, L] per row
  (False = never attended), ``slot_bucket`` [B, H, S] (same-bucket-only), ``document_ids`` [B, L] per row (a key
  in another document is never attended), then self (``self_mask``: a query's own position gets -1e5).
  ``allow_duplicate_attention=False`` subtracts log(number of rounds' windows in which the key occurs)
  (the duplicate-attention correction; the config key of the same name).
- Positions are the rows unless ``positions`` [B, H, S] gives each slot's original position, and the
  duplicate correction's chunks come from ``index`` unless ``chunk_of`` [B, H, R, L] (the flat chunk of
  each row's token in each round) and ``n_chunks`` (their number) are given: the form in which a
  sequence-parallel rank attends over its piece of a globally sorted order (``parallel/bucket.py``).
- Returns out [B, L, H, D] (dtype of v) merged over rounds: one softmax over the union of every round's
  window occurrences, which equals HF's log-sum-exp merge of per-round outputs; and lse [B, L, H] (float32,
  float64 for float64 inputs), the log-sum-exp of all those logits. Both are differentiable.

Implementations are interchangeable, named in ``kernels.backends``: the PyTorch reference (plain autograd
over sorted copies, the oracle), the blockwise PyTorch core (own backward; keeps only q, k, v, index, out and
lse; any device) and the fused Triton kernel (CUDA), whose module is imported by name at first use.
``backend="auto"`` picks a fused kernel on CUDA when one imports and takes the call, else the blockwise core (at
every length: on CPU it is also faster than the reference's plain autograd, 0.65 s vs 0.86 s for one
bench-config layer's forward + backward at 4K tokens, one thread). On CUDA, a call no fused kernel takes
(or a missing triton) warns once, naming the reason, and runs on the blockwise core.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Callable

from torch import Tensor

from reformer_dist.kernels.backends import BACKENDS, FUSED, PORTABLE, Backend
from reformer_dist.kernels.blockwise import chunked_attention_blockwise
from reformer_dist.kernels.reference import chunked_attention_reference

AttentionCore = Callable[..., tuple[Tensor, Tensor]]

# (q, **kwargs) -> None when the backend takes this call, else the reason it does not
Unsupported = Callable[..., "str | None"]
# name -> (implementation, its Unsupported predicate): the cores loaded so far, in ``BACKENDS`` order
_BACKENDS: dict[str, tuple[AttentionCore, Unsupported]] = {
    "reference": (chunked_attention_reference, lambda q, **kw: None),
    "blockwise": (chunked_attention_blockwise, lambda q, **kw: None),
}
_MISSING: dict[str, str] = {}  # fused cores whose module does not import -> why (tried once per process)
_WARNED: set[str] = set()  # fallback reasons already announced (one warning each per process)


def available_backends() -> list[str]:
    """Names accepted by ``backend=`` besides "auto": the portable cores and the fused ones that import."""
    _load_fused()
    return list(_BACKENDS)


def _load_fused() -> None:
    """Import every fused core not tried yet (``backends.FUSED``); one whose module fails to import is left out."""
    for name, module in FUSED.items():
        if name in _BACKENDS or name in _MISSING:
            continue
        try:
            mod = importlib.import_module(module)
        except ImportError as e:  # triton is optional: the PyTorch cores remain
            _MISSING[name] = f"{e}"
            continue
        _BACKENDS[name] = (getattr(mod, f"chunked_attention_{name}"), mod.unsupported)


def _warn_fallback(reason: str) -> None:
    """One warning per reason: CUDA attention runs on the blockwise PyTorch core instead of a fused kernel."""
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"attention on CUDA uses the blockwise PyTorch core (slower): {reason}", stacklevel=3)


def check_call(
    q: Tensor,
    k: Tensor | None,
    v: Tensor,
    index: Tensor | None,
    *,
    chunk_len: int,
    key_valid: Tensor | None = None,
    slot_bucket: Tensor | None = None,
    document_ids: Tensor | None = None,
) -> None:
    """Raise ValueError naming the argument when a call breaks the contract's shapes."""
    if q.dim() != 4:
        raise ValueError(f"chunked_attention: q must be [B, L, H, D], got shape {tuple(q.shape)}")
    b, length, h, _ = q.shape
    for name, t in (("k", k), ("v", v)):
        if t is not None and t.shape[:3] != q.shape[:3]:
            raise ValueError(f"chunked_attention: {name} shape {tuple(t.shape)} does not match q {tuple(q.shape)}")
    s = length if index is None else index.shape[-1]
    if index is not None and (index.shape[:2] != (b, h) or index.dim() != 3 or s % length):
        raise ValueError(
            f"chunked_attention: index must be [B, H, R*L] = [{b}, {h}, R*{length}], got {tuple(index.shape)}"
        )
    if chunk_len < 1 or length % chunk_len:
        raise ValueError(f"chunked_attention: length {length} is not a multiple of chunk_len {chunk_len}")
    for name, t in (("key_valid", key_valid), ("document_ids", document_ids)):
        if t is not None and tuple(t.shape) != (b, length):
            raise ValueError(f"chunked_attention: {name} must be [B, L] = [{b}, {length}], got {tuple(t.shape)}")
    if slot_bucket is not None and tuple(slot_bucket.shape) != (b, h, s):
        raise ValueError(
            f"chunked_attention: slot_bucket must be [B, H, S] = [{b}, {h}, {s}], got {tuple(slot_bucket.shape)}"
        )


def chunked_attention(
    q: Tensor, k: Tensor | None, v: Tensor, index: Tensor | None = None, *, backend: Backend = "auto", **kwargs
) -> tuple[Tensor, Tensor]:
    """Dispatch to a backend; the module docstring states the contract every backend implements."""
    check_call(
        q,
        k,
        v,
        index,
        chunk_len=kwargs["chunk_len"],
        key_valid=kwargs.get("key_valid"),
        slot_bucket=kwargs.get("slot_bucket"),
        document_ids=kwargs.get("document_ids"),
    )
    if backend == "auto":
        if q.is_cuda:
            _load_fused()
            reasons = []
            for name, (fn, unsupported) in _BACKENDS.items():
                if name not in PORTABLE:
                    why = unsupported(q, **kwargs)
                    if why is None:
                        return fn(q, k, v, index, **kwargs)
                    reasons.append(f"{name}: {why}")
            _warn_fallback("; ".join(reasons) or "triton is not installed (pip install triton)")
        backend = "blockwise"
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; known: {list(BACKENDS)}")
    _load_fused()
    if backend not in _BACKENDS:
        raise ValueError(
            f"attention backend {backend!r} is not available ({_MISSING.get(backend)}); available: "
            f"{available_backends()}"
        )
    return _BACKENDS[backend][0](q, k, v, index, **kwargs)
