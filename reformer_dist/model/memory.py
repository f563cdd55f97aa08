"""The memory model of a training step: activation bytes per token, and the predicted peak of a run per GPU.

Owned here so the benchmarks (``benchmarks/memory_per_token.py``, ``benchmarks/sp_memory.py``) that measure it
and ``reformer-train --dry-run`` that prints its prediction use one formula. Term by term in
``predicted_bytes_per_token``; docs/sequence_parallel.md ("Memory model") has the table and the measurements.
"""

from __future__ import annotations

import torch

from reformer_dist.model.config import ReformerConfig
from reformer_dist.model.reformer import ReformerLM

GIB = 2**30
CONTEXT_BYTES = 1.0 * GIB  # CUDA context, attention-core and hashing block temporaries, allocator slack


def predicted_bytes_per_token(
    d_model: int,
    n_heads: int,
    d_head: int,
    n_hashes: int,
    compute_bytes: int = 4,
    ulysses: int = 1,
    bucket: int = 1,
    groups: int = 1,
    local_layers: bool = False,
) -> dict[str, float]:
    """Memory model of a training step, per token of the sequence per GPU; independent of n_layers.

    One GPU (and Ulysses): the peak is inside one layer's attention backward during the reversible backward,
    which works on one head group of n_heads / G heads at a time (``model.head_groups`` = G):
    - streams: y1, y2 (rebuilt in place into x1, x2) and their gradients, fp32: 4 x 4 x d_model;
    - attention of one head group: qk, v, the core's output, its gradient, d(qk), d(v) in the compute dtype:
      6 x c x n_heads x d_head / G (the LayerNorm output before the projections is a recipe, not values; with
      G > 1 the projections and the output projection also run over token chunks, so neither the LayerNorm
      output, its gradient nor the block's full-width output exists for all of L);
    - the core's fp32 head-group accumulators under bf16 (one head at a time, whatever G): 2 x 4 x d_head;
    - integers and small rows: the int32 sort permutation (4 R H / G), lse (hi, lo) and delta (12 H / G),
      LayerNorm statistics (8; with G > 1 one set per input projection: 16), token ids, labels and axial
      indices (int64, 32).
    A model with local or full layers (``local_layers``): their separate q, k, v make the attention term
    8 x c x d / G (q, k, v, out, dout, dq, dk, dv), which is the larger one.
    Ulysses (U ranks share the heads): everything divides by U; qk, the output and its gradient of the group
    also exist in the token-sharded layout around the all-to-alls (+3 c d / G).
    Bucket sharding (K ranks share the sorted order): the peak is in the forward recompute of an LSH layer,
    dominated by the R-fold copies the owners of the slots hold: streams, LayerNorm output, local qk and v,
    the extended pieces of qk and v (2 R c d), the pieces' output (R c d), the outgoing and incoming results
    of the return exchange and their scatter to token order (3 R c d; the collective keeps its send buffer
    until the work completes), integers of the pieces and routes (8 R H (6 + R)). With Ulysses in front (2D)
    qk (twice: DistributedAttention's q/k/v interface) and v also exist after its all-to-all (+3 c d).
    Everything divides by U x K.
    """
    d = n_heads * d_head
    c = compute_bytes
    g = float(groups)
    ints = (4.0 * n_hashes * n_heads + 12.0 * n_heads) / g + (8 if groups == 1 else 16) + 32
    ulysses_extra = 3.0 * c * d / g if ulysses > 1 else 0.0
    if bucket == 1:
        terms = {
            "streams and their gradients (fp32)": 16.0 * d_model,
            "attention backward of one head group: qk, v, out, dout, dqk, dv (+ separate k)": (
                8.0 if local_layers else 6.0
            )
            * c
            * d
            / g,
            "Ulysses: the group's qk, output and its gradient in both layouts": ulysses_extra,
            "fp32 head accumulators (bf16 only)": 8.0 * d_head if c < 4 else 0.0,
            "sort permutation, lse, delta (per group), norm stats, ids": ints,
        }
    else:
        terms = {
            "streams and their gradients (fp32)": 16.0 * d_model,
            "LayerNorm output (G = 1 only), the group's local qk and v": (c * d_model if groups == 1 else 0.0)
            + 2.0 * c * d / g,
            "Ulysses: the group's qk (twice) and v after the all-to-all": ulysses_extra,
            "the group's pieces: qk, v (R-fold), output, return exchange": 6.0 * n_hashes * c * d / g,
            "integers (ids, positions, buckets, chunks, routes; per group)": ints
            + 8.0 * n_hashes * n_heads * (6 + n_hashes) / g,
        }
    return {k: v / (ulysses * bucket) for k, v in terms.items()}


def predicted_peak(
    cfg: ReformerConfig,
    seq_len: int,
    *,
    micro_batch: int = 1,
    compute_bytes: int = 2,
    sequence_parallel: int = 1,
    ulysses: int | None = None,
) -> dict[str, float]:
    """Predicted peak bytes per GPU of one training step of ``micro_batch`` sequences of ``seq_len`` tokens.

    Activations: ``predicted_bytes_per_token`` (head groups by ``cfg.head_groups_for``) x the tokens of one
    GPU; constants: 16 bytes per parameter (fp32 weights, gradients, Adam's two moments; ZeRO sharding only
    lowers them) and ``CONTEXT_BYTES``. Keys: per_token, groups, activations, constants, peak (bytes).
    """
    u = sequence_parallel if ulysses is None else ulysses
    groups = cfg.head_groups_for(seq_len, u)
    kinds = set(cfg.attn_layers)
    per_token = sum(
        predicted_bytes_per_token(
            cfg.d_model,
            cfg.n_heads,
            cfg.d_head,
            cfg.n_hashes,
            compute_bytes=compute_bytes,
            ulysses=u,
            bucket=sequence_parallel // u,
            groups=groups,
            local_layers=bool(kinds - {"lsh"}),
        ).values()
    )
    with torch.device("meta"):  # counts parameters without allocating them
        params = sum(p.numel() for p in ReformerLM(cfg).parameters())
    activations = per_token * micro_batch * seq_len / sequence_parallel
    constants = 16.0 * params + CONTEXT_BYTES
    return {
        "per_token": per_token,
        "groups": groups,
        "activations": activations,
        "constants": constants,
        "peak": activations + constants,
    }
