"""Fused Triton attention core: the blockwise algorithm in three kernels, same contract as every core.

``kernels.chunked_attention`` imports this module by name at first use (``kernels.backends.FUSED``) and takes
``chunked_attention_triton`` and ``unsupported`` from it (``backend="auto"`` picks it on CUDA). Kernels, each
launched per head (the head index is a runtime argument: one compile serves every head):

- ``_fwd``: one program per (query sub-tile of a sorted chunk, batch). Queries and the look-around
  keys/values are loaded straight from the unsorted [B, L, H, D] tensors through the sort permutation (no
  gathered copies), one key sub-tile at a time; logits are masked exactly as ``logits.masked_logits`` does,
  and an online softmax with fp32 accumulation gives the output and log-sum-exp, written at the queries'
  original positions in a per-round buffer. The rounds are then merged by log-sum-exp (one softmax over
  their union).
- ``_bwd_dq``: per query sub-tile, recompute the logits, P = exp(logits - merged lse),
  dS = P * (dO.V^T - delta) (delta = rowsum(dO*O) - dlse: FlashAttention-2), dQ += dS.K.
- ``_bwd_dkdv``: per key sub-tile, over the query sub-tiles of the chunks whose windows contain it,
  dV += P^T.dO and dK += dS^T.Q (shared-QK keys: through the key normalisation into dQ).
Gradients of one position arrive from several rounds and windows: fp32 atomic adds.

Tiles are never chunk x chunk: a chunk of up to 256 is cut into sub-tiles of at most 64 (``tiles_for``),
so shared memory and registers do not grow with the chunk length. ``unsupported`` says exactly which calls
the kernels take (chunk <= 256, head size <= 128, fp32/bf16/fp16): what ``tools/triton_compile_check.py``
compiles for sm_90 and sm_80 in CI. fp32 inputs multiply with tf32x3 (``precision``). All offsets are 64-bit.
Tested on CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set by the tests) and on CUDA by
``tests/gpu``.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from reformer_dist.kernels.blockwise import split_lse
from reformer_dist.kernels.lean_function import CoreInputs, apply_lean
from reformer_dist.kernels.logits import KEY_NORM_EPS, MASK_VALUE, SELF_MASK_VALUE, chunk_of_positions

# globals a @triton.jit function reads must be constexpr
_MASK = tl.constexpr(MASK_VALUE)
_SELF = tl.constexpr(SELF_MASK_VALUE)
_EPS = tl.constexpr(KEY_NORM_EPS)

MAX_CHUNK = 256  # chunk lengths the compile check verifies (tools/triton_compile_check.py)
MAX_HEAD = 128  # head sizes likewise
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Tiles(NamedTuple):
    """Sub-tile sizes and launch options of one call: a query tile of ``bq`` rows against key tiles of ``bk``,
    head size padded to ``block_d``. From the small fixed set that the compile check verifies on sm_90 and
    sm_80 (shared memory within limits, no spills in bf16): never the whole chunk x chunk tile."""

    bq: int
    bk: int
    block_d: int
    num_warps: int
    num_stages: int


def tiles_for(chunk_len: int, d: int, dtype: torch.dtype) -> Tiles:
    """The tile set of a chunk length, head size and dtype (see ``Tiles``; chosen from the compile check's table in
    benchmarks/RESULTS.md: in 16 bits the largest tiles with no spills on sm_90 and sm_80 in the bench and shipped
    configs)."""
    block_d = max(16, triton.next_power_of_2(d))
    if dtype == torch.float32:  # tf32x3 keeps each operand as two TF32 halves: smaller tiles
        bq, bk = (32, 32) if block_d <= 64 else (16, 32)
    else:  # 128-wide heads: small tiles keep dk and dv (key rows x 128, fp32) within the registers on sm_80 too
        bq, bk = (64, 32) if block_d <= 64 else (32, 16)
    fit = max(16, triton.next_power_of_2(chunk_len))  # a short chunk needs no wider tile than itself
    bq, bk = min(bq, fit), min(bk, fit)
    warps = 8 if dtype == torch.float32 or bq >= 64 else 4  # 8 warps on small 16-bit tiles spill
    return Tiles(bq, bk, block_d, warps, 2)


def precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: fp32 inputs use tf32x3 (three TF32 tensor-core products, error close to fp32's;
    IEEE fp32 compiles to unrolled FMA code that takes minutes in ptxas and spills), 16-bit inputs their own."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation; ``UPCAST`` widens the operands first (exact products, as tensor cores form
    them) because Triton 3.9's interpreter multiplies bf16 tiles as their uint16 storage."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _slot_positions(idx_ptr, slots, lane, HAS_INDEX: tl.constexpr):
    """Original positions (int64) of sorted slots; identity without an index."""
    if HAS_INDEX:
        return tl.load(idx_ptr + slots, mask=lane, other=0).to(tl.int64)
    return slots.to(tl.int64)


@triton.jit
def _load_keys(k_ptr, rows, lane, offs_d, d_ok, stride_d, D: tl.constexpr, SCALE: tl.constexpr, SHARED: tl.constexpr):
    """(raw rows, keys) of a key chunk: shared-QK keys are RMS-normalised and scaled by 1/sqrt(D) in fp32 and
    cast back (``logits.normalize_keys``); separate keys are scaled by 1/sqrt(D) (``logits.scale_keys``)."""
    raw = tl.load(k_ptr + rows[:, None] + offs_d[None, :] * stride_d, mask=lane[:, None] & d_ok[None, :], other=0.0)
    xf = raw.to(tl.float32)
    if SHARED:
        inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / D + _EPS)
        keys = (xf * inv[:, None] * SCALE).to(raw.dtype)
    else:
        keys = (xf * SCALE).to(raw.dtype)
    return raw, keys


@triton.jit
def _scores(
    q,
    keys,
    pos_q,
    pos_k,
    q_lane,
    k_lane,
    b,
    h,
    key_valid_ptr,
    bucket_ptr,
    chunk_ptr,
    document_ids_ptr,
    mpos_ptr,
    slots_q,
    slots_k,
    L,
    N,
    RC,
    H,
    S,
    NCH,
    CAUSAL: tl.constexpr,
    SELF_MASK: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr,
    HAS_BUCKET: tl.constexpr,
    HAS_DOCUMENT_IDS: tl.constexpr,
    HAS_POS: tl.constexpr,
    ALLOW_DUPLICATE_ATTENTION: tl.constexpr,
    N_CHUNKS_BEFORE: tl.constexpr,
    N_CHUNKS_AFTER: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Masked logits (fp32) of a query chunk against a key chunk and the mask of replaced entries.

    pos_q/pos_k are the slots' rows (where q/k/v, key_valid, document_ids and chunk_of are read); the causal and
    self masks use the original positions, which are the rows unless HAS_POS gives them per slot."""
    s = _dot(q, tl.trans(keys), PREC, UPCAST).to(tl.float32)
    if not ALLOW_DUPLICATE_ATTENTION:  # subtract log(number of (round, window) pairs holding the key)
        counts = tl.zeros(s.shape, dtype=tl.float32)
        for r1 in range(0, RC):
            cq = tl.load(chunk_ptr + ((b * H + h) * RC + r1) * L + pos_q, mask=q_lane, other=0)
            for r2 in range(0, RC):
                ck = tl.load(chunk_ptr + ((b * H + h) * RC + r2) * L + pos_k, mask=k_lane, other=0)
                diff = ((ck[None, :] - cq[:, None]) % NCH + NCH) % NCH
                for o in tl.static_range(0, N_CHUNKS_BEFORE + N_CHUNKS_AFTER + 1):
                    off = ((o - N_CHUNKS_BEFORE) % NCH + NCH) % NCH
                    counts += tl.where(diff == off, 1.0, 0.0)
        s = s - tl.log(tl.maximum(counts, 1.0))
    visible = k_lane[None, :] & q_lane[:, None]
    mq, mk = pos_q, pos_k
    if HAS_POS:
        mq = tl.load(mpos_ptr + (b * H + h) * S + slots_q, mask=q_lane, other=0).to(tl.int64)
        mk = tl.load(mpos_ptr + (b * H + h) * S + slots_k, mask=k_lane, other=0).to(tl.int64)
    if CAUSAL:
        visible = visible & (mq[:, None] >= mk[None, :])
    if HAS_KEY_VALID:
        kv = tl.load(key_valid_ptr + b * L + pos_k, mask=k_lane, other=0)
        visible = visible & (kv[None, :] != 0)
    if HAS_BUCKET:
        bq = tl.load(bucket_ptr + (b * H + h) * S + slots_q, mask=q_lane, other=0)
        bk = tl.load(bucket_ptr + (b * H + h) * S + slots_k, mask=k_lane, other=0)
        visible = visible & (bq[:, None] == bk[None, :])
    if HAS_DOCUMENT_IDS:
        dq_ = tl.load(document_ids_ptr + b * L + pos_q, mask=q_lane, other=0)
        dk_ = tl.load(document_ids_ptr + b * L + pos_k, mask=k_lane, other=0)
        visible = visible & (dq_[:, None] == dk_[None, :])
    s = tl.where(visible, s, _MASK)
    replaced = ~visible
    if SELF_MASK:
        is_self = mq[:, None] == mk[None, :]
        s = tl.where(is_self, _SELF, s)
        replaced = replaced | is_self
    s = tl.where(k_lane[None, :], s, float("-inf"))  # lanes past the chunk are not keys at all
    return s, replaced


@triton.jit
def _rows(ptr, b, pos, h, sb, sl, sh, sd, offs_d, mask):
    """[BLOCK, BLOCK_D] rows of a [B, L, H, D] tensor: batch b, positions ``pos``, head h."""
    return tl.load(ptr + b * sb + pos[:, None] * sl + h * sh + offs_d[None, :] * sd, mask=mask, other=0.0)


@triton.jit
def _per_row(ptr, b, pos, h, L, H, lane):
    """Values of a [B, L, H] tensor (lse, lo, delta) at the rows of a chunk."""
    return tl.load(ptr + (b * L + pos) * H + h, mask=lane, other=0.0)


@triton.jit
def _key_chunk(
    q_ptr,
    k_ptr,
    v_ptr,
    b,
    pos_k,
    h,
    sqb,
    sql,
    sqh,
    sqd,
    skb,
    skl,
    skh,
    skd,
    svb,
    svl,
    svh,
    svd,
    k_lane,
    offs_d,
    d_ok,
    D: tl.constexpr,
    SCALE: tl.constexpr,
    SHARED: tl.constexpr,
):
    """(raw key rows, keys, values) of a key chunk: shared-QK keys are read from q."""
    if SHARED:
        raw, keys = _load_keys(q_ptr, b * sqb + pos_k * sql + h * sqh, k_lane, offs_d, d_ok, sqd, D, SCALE, True)
    else:
        raw, keys = _load_keys(k_ptr, b * skb + pos_k * skl + h * skh, k_lane, offs_d, d_ok, skd, D, SCALE, False)
    vv = _rows(v_ptr, b, pos_k, h, svb, svl, svh, svd, offs_d, k_lane[:, None] & d_ok[None, :])
    return raw, keys, vv


# Every kernel takes the same pointers, strides, sizes and flags; one program per (query or key sub-tile of a
# chunk of all rounds, batch) of head h. Pointers: q, k (= q for shared QK), v, index, key_valid, slot_bucket,
# chunk_of, document_ids, positions. The batch, chunk and head indices are widened to int64 before any product, so
# every offset (b * stride, (b*H + h) * S, position * stride) is 64-bit: they pass 2^31 at batch > 1 and 1M+
# tokens. ``h`` is not specialised (one compile serves every head).
@triton.jit(do_not_specialize=["h"])
def _fwd(
    q_ptr,
    k_ptr,
    v_ptr,
    idx_ptr,
    key_valid_ptr,
    bucket_ptr,
    chunk_ptr,
    document_ids_ptr,
    mpos_ptr,
    o_ptr,
    m_ptr,
    l_ptr,
    sqb,
    sql,
    sqh,
    sqd,
    skb,
    skl,
    skh,
    skd,
    svb,
    svl,
    svh,
    svd,
    h,
    B,
    L,
    H,
    S,
    N,
    R,
    NCH,
    RC,
    M: tl.constexpr,
    D: tl.constexpr,
    SCALE: tl.constexpr,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    N_CHUNKS_BEFORE: tl.constexpr,
    N_CHUNKS_AFTER: tl.constexpr,
    CAUSAL: tl.constexpr,
    SELF_MASK: tl.constexpr,
    SHARED: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr,
    HAS_BUCKET: tl.constexpr,
    HAS_DOCUMENT_IDS: tl.constexpr,
    HAS_POS: tl.constexpr,
    ALLOW_DUPLICATE_ATTENTION: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    NSQ: tl.constexpr = (M + BQ - 1) // BQ
    NSK: tl.constexpr = (M + BK - 1) // BK
    pid = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    hh = h.to(tl.int64)
    c = pid // NSQ
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    in_q = (pid % NSQ) * BQ + tl.arange(0, BQ)  # query lanes' places in the chunk (a tile may pass its end)
    lane_q = in_q < M
    slots_q = c * M + in_q
    base = (b * H + hh) * S
    pos_q = _slot_positions(idx_ptr + base, slots_q, lane_q, HAS_INDEX)
    q = _rows(q_ptr, b, pos_q, hh, sqb, sql, sqh, sqd, offs_d, lane_q[:, None] & d_ok[None, :])
    m_i = tl.full([BQ], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BQ], dtype=tl.float32)
    acc = tl.zeros([BQ, BLOCK_D], dtype=tl.float32)
    # key sub-tiles of the window chunks, which wrap over all rounds
    for j in range(0, (N_CHUNKS_BEFORE + N_CHUNKS_AFTER + 1) * NSK):
        kc = ((c + j // NSK - N_CHUNKS_BEFORE) % N + N) % N
        in_k = (j % NSK) * BK + tl.arange(0, BK)
        lane_k = in_k < M
        slots_k = kc * M + in_k
        pos_k = _slot_positions(idx_ptr + base, slots_k, lane_k, HAS_INDEX)
        _, keys, vv = _key_chunk(
            q_ptr,
            k_ptr,
            v_ptr,
            b,
            pos_k,
            hh,
            sqb,
            sql,
            sqh,
            sqd,
            skb,
            skl,
            skh,
            skd,
            svb,
            svl,
            svh,
            svd,
            lane_k,
            offs_d,
            d_ok,
            D,
            SCALE,
            SHARED,
        )
        s, _ = _scores(
            q,
            keys,
            pos_q,
            pos_k,
            lane_q,
            lane_k,
            b,
            hh,
            key_valid_ptr,
            bucket_ptr,
            chunk_ptr,
            document_ids_ptr,
            mpos_ptr,
            slots_q,
            slots_k,
            L,
            N,
            RC,
            H,
            S,
            NCH,
            CAUSAL,
            SELF_MASK,
            HAS_KEY_VALID,
            HAS_BUCKET,
            HAS_DOCUMENT_IDS,
            HAS_POS,
            ALLOW_DUPLICATE_ATTENTION,
            N_CHUNKS_BEFORE,
            N_CHUNKS_AFTER,
            PREC,
            UPCAST,
        )
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(vv.dtype), vv, PREC, UPCAST).to(tl.float32)
        m_i = m_new
    out = acc / l_i[:, None]
    # per-round buffers [R, B, L, D] and [R, B, L] x 2 at the queries' original positions (one writer each);
    # the row maximum and sum are kept apart so the merge is exact for a query that sees only itself
    r = (c * M) // L
    row = (r * B + b) * L + pos_q
    tl.store(
        o_ptr + row[:, None] * D + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=lane_q[:, None] & d_ok[None, :]
    )
    tl.store(m_ptr + row, m_i, mask=lane_q)
    tl.store(l_ptr + row, l_i, mask=lane_q)


@triton.jit(do_not_specialize=["h"])
def _bwd_dq(
    q_ptr,
    k_ptr,
    v_ptr,
    idx_ptr,
    key_valid_ptr,
    bucket_ptr,
    chunk_ptr,
    document_ids_ptr,
    mpos_ptr,
    do_ptr,
    lse_ptr,
    lo_ptr,
    delta_ptr,
    dq_ptr,
    sqb,
    sql,
    sqh,
    sqd,
    skb,
    skl,
    skh,
    skd,
    svb,
    svl,
    svh,
    svd,
    sdb,
    sdl,
    sdh,
    sdd,
    sgb,
    sgl,
    sgd,
    h,
    L,
    H,
    S,
    N,
    R,
    NCH,
    RC,
    M: tl.constexpr,
    D: tl.constexpr,
    SCALE: tl.constexpr,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    N_CHUNKS_BEFORE: tl.constexpr,
    N_CHUNKS_AFTER: tl.constexpr,
    CAUSAL: tl.constexpr,
    SELF_MASK: tl.constexpr,
    SHARED: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr,
    HAS_BUCKET: tl.constexpr,
    HAS_DOCUMENT_IDS: tl.constexpr,
    HAS_POS: tl.constexpr,
    ALLOW_DUPLICATE_ATTENTION: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    NSQ: tl.constexpr = (M + BQ - 1) // BQ
    NSK: tl.constexpr = (M + BK - 1) // BK
    pid = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    hh = h.to(tl.int64)
    c = pid // NSQ
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    in_q = (pid % NSQ) * BQ + tl.arange(0, BQ)
    lane_q = in_q < M
    qd_mask = lane_q[:, None] & d_ok[None, :]
    slots_q = c * M + in_q
    base = (b * H + hh) * S
    pos_q = _slot_positions(idx_ptr + base, slots_q, lane_q, HAS_INDEX)
    q = _rows(q_ptr, b, pos_q, hh, sqb, sql, sqh, sqd, offs_d, qd_mask)
    do = _rows(do_ptr, b, pos_q, hh, sdb, sdl, sdh, sdd, offs_d, qd_mask)
    lse = _per_row(lse_ptr, b, pos_q, hh, L, H, lane_q)
    lo = _per_row(lo_ptr, b, pos_q, hh, L, H, lane_q)
    delta = _per_row(delta_ptr, b, pos_q, hh, L, H, lane_q)
    dq = tl.zeros([BQ, BLOCK_D], dtype=tl.float32)
    for j in range(0, (N_CHUNKS_BEFORE + N_CHUNKS_AFTER + 1) * NSK):
        kc = ((c + j // NSK - N_CHUNKS_BEFORE) % N + N) % N
        in_k = (j % NSK) * BK + tl.arange(0, BK)
        lane_k = in_k < M
        slots_k = kc * M + in_k
        pos_k = _slot_positions(idx_ptr + base, slots_k, lane_k, HAS_INDEX)
        _, keys, vv = _key_chunk(
            q_ptr,
            k_ptr,
            v_ptr,
            b,
            pos_k,
            hh,
            sqb,
            sql,
            sqh,
            sqd,
            skb,
            skl,
            skh,
            skd,
            svb,
            svl,
            svh,
            svd,
            lane_k,
            offs_d,
            d_ok,
            D,
            SCALE,
            SHARED,
        )
        s, replaced = _scores(
            q,
            keys,
            pos_q,
            pos_k,
            lane_q,
            lane_k,
            b,
            hh,
            key_valid_ptr,
            bucket_ptr,
            chunk_ptr,
            document_ids_ptr,
            mpos_ptr,
            slots_q,
            slots_k,
            L,
            N,
            RC,
            H,
            S,
            NCH,
            CAUSAL,
            SELF_MASK,
            HAS_KEY_VALID,
            HAS_BUCKET,
            HAS_DOCUMENT_IDS,
            HAS_POS,
            ALLOW_DUPLICATE_ATTENTION,
            N_CHUNKS_BEFORE,
            N_CHUNKS_AFTER,
            PREC,
            UPCAST,
        )
        p = tl.exp((s - lse[:, None]) - lo[:, None])  # of the softmax over the union of rounds (exact lse)
        dp = _dot(do, tl.trans(vv), PREC, UPCAST).to(tl.float32)
        ds = tl.where(replaced, 0.0, p * (dp - delta[:, None]))
        dq += _dot(ds.to(keys.dtype), keys, PREC, UPCAST).to(tl.float32)
    tl.atomic_add(dq_ptr + b * sgb + pos_q[:, None] * sgl + offs_d[None, :] * sgd, dq, mask=qd_mask)


@triton.jit(do_not_specialize=["h"])
def _bwd_dkdv(
    q_ptr,
    k_ptr,
    v_ptr,
    idx_ptr,
    key_valid_ptr,
    bucket_ptr,
    chunk_ptr,
    document_ids_ptr,
    mpos_ptr,
    do_ptr,
    lse_ptr,
    lo_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    sqb,
    sql,
    sqh,
    sqd,
    skb,
    skl,
    skh,
    skd,
    svb,
    svl,
    svh,
    svd,
    sdb,
    sdl,
    sdh,
    sdd,
    sgb,
    sgl,
    sgd,
    h,
    L,
    H,
    S,
    N,
    R,
    NCH,
    RC,
    M: tl.constexpr,
    D: tl.constexpr,
    SCALE: tl.constexpr,
    BQ: tl.constexpr,
    BK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    N_CHUNKS_BEFORE: tl.constexpr,
    N_CHUNKS_AFTER: tl.constexpr,
    CAUSAL: tl.constexpr,
    SELF_MASK: tl.constexpr,
    SHARED: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    HAS_KEY_VALID: tl.constexpr,
    HAS_BUCKET: tl.constexpr,
    HAS_DOCUMENT_IDS: tl.constexpr,
    HAS_POS: tl.constexpr,
    ALLOW_DUPLICATE_ATTENTION: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    NSQ: tl.constexpr = (M + BQ - 1) // BQ
    NSK: tl.constexpr = (M + BK - 1) // BK
    pid = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    hh = h.to(tl.int64)
    kc = pid // NSK
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    in_k = (pid % NSK) * BK + tl.arange(0, BK)
    lane_k = in_k < M
    kd_mask = lane_k[:, None] & d_ok[None, :]
    slots_k = kc * M + in_k
    base = (b * H + hh) * S
    pos_k = _slot_positions(idx_ptr + base, slots_k, lane_k, HAS_INDEX)
    _, keys, vv = _key_chunk(
        q_ptr,
        k_ptr,
        v_ptr,
        b,
        pos_k,
        hh,
        sqb,
        sql,
        sqh,
        sqd,
        skb,
        skl,
        skh,
        skd,
        svb,
        svl,
        svh,
        svd,
        lane_k,
        offs_d,
        d_ok,
        D,
        SCALE,
        SHARED,
    )
    dk = tl.zeros([BK, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BK, BLOCK_D], dtype=tl.float32)
    for j in range(0, (N_CHUNKS_BEFORE + N_CHUNKS_AFTER + 1) * NSQ):
        # the query chunk whose window offset j // NSQ - N_CHUNKS_BEFORE is this one
        c = ((kc - (j // NSQ - N_CHUNKS_BEFORE)) % N + N) % N
        in_q = (j % NSQ) * BQ + tl.arange(0, BQ)
        lane_q = in_q < M
        qd_mask = lane_q[:, None] & d_ok[None, :]
        slots_q = c * M + in_q
        pos_q = _slot_positions(idx_ptr + base, slots_q, lane_q, HAS_INDEX)
        q = _rows(q_ptr, b, pos_q, hh, sqb, sql, sqh, sqd, offs_d, qd_mask)
        do = _rows(do_ptr, b, pos_q, hh, sdb, sdl, sdh, sdd, offs_d, qd_mask)
        lse = _per_row(lse_ptr, b, pos_q, hh, L, H, lane_q)
        lo = _per_row(lo_ptr, b, pos_q, hh, L, H, lane_q)
        delta = _per_row(delta_ptr, b, pos_q, hh, L, H, lane_q)
        s, replaced = _scores(
            q,
            keys,
            pos_q,
            pos_k,
            lane_q,
            lane_k,
            b,
            hh,
            key_valid_ptr,
            bucket_ptr,
            chunk_ptr,
            document_ids_ptr,
            mpos_ptr,
            slots_q,
            slots_k,
            L,
            N,
            RC,
            H,
            S,
            NCH,
            CAUSAL,
            SELF_MASK,
            HAS_KEY_VALID,
            HAS_BUCKET,
            HAS_DOCUMENT_IDS,
            HAS_POS,
            ALLOW_DUPLICATE_ATTENTION,
            N_CHUNKS_BEFORE,
            N_CHUNKS_AFTER,
            PREC,
            UPCAST,
        )
        p = tl.where(lane_q[:, None], tl.exp((s - lse[:, None]) - lo[:, None]), 0.0)
        dv += _dot(tl.trans(p).to(do.dtype), do, PREC, UPCAST).to(tl.float32)
        dp = _dot(do, tl.trans(vv), PREC, UPCAST).to(tl.float32)
        ds = tl.where(replaced, 0.0, p * (dp - delta[:, None]))
        dk += _dot(tl.trans(ds).to(q.dtype), q, PREC, UPCAST).to(tl.float32)
    if SHARED:  # keys = x r / sqrt(D), r = (mean(x^2) + eps)^-1/2: dx = r/sqrt(D) (dk - x r^2 (x.dk) / D)
        # the raw rows are read again rather than kept live through the loop (registers, not bandwidth, bind)
        x = _rows(q_ptr, b, pos_k, hh, sqb, sql, sqh, sqd, offs_d, kd_mask).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + _EPS)
        dot = tl.sum(x * dk, axis=1)
        dk = (r * SCALE)[:, None] * (dk - x * (r * r * dot / D)[:, None])
    else:
        dk = dk * SCALE
    tl.atomic_add(dk_ptr + b * sgb + pos_k[:, None] * sgl + offs_d[None, :] * sgd, dk, mask=kd_mask)
    tl.atomic_add(dv_ptr + b * sgb + pos_k[:, None] * sgl + offs_d[None, :] * sgd, dv, mask=kd_mask)


def _strides(t: Tensor | None, like: Tensor) -> tuple[int, int, int, int]:
    return tuple((t if t is not None else like).stride())


class _Call:
    """``LeanCore`` of one call: sizes, flags and the pointer tensors shared by the three kernels."""

    def __init__(
        self,
        x: CoreInputs,
        *,
        chunk_len: int,
        n_chunks_before: int,
        n_chunks_after: int,
        causal: bool,
        self_mask: bool,
        allow_duplicate_attention: bool,
        n_chunks: int | None,
    ):
        q, k, index, key_valid, slot_bucket, document_ids, positions, chunk_of = (
            x.q,
            x.k,
            x.index,
            x.key_valid,
            x.slot_bucket,
            x.document_ids,
            x.positions,
            x.chunk_of,
        )
        b, length, h, d = q.shape
        self.b, self.length, self.h, self.d = b, length, h, d
        self.s = length if index is None else index.shape[-1]
        self.r, self.m = self.s // length, chunk_len
        self.n = self.s // chunk_len
        dev = q.device
        dummy = torch.zeros(1, dtype=torch.int32, device=dev)
        self.index = index.to(torch.int32).contiguous() if index is not None else dummy
        self.valid = key_valid.to(torch.int8).contiguous() if key_valid is not None else dummy
        self.bucket = slot_bucket.to(torch.int32).contiguous() if slot_bucket is not None else dummy
        self.doc = document_ids.to(torch.int32).contiguous() if document_ids is not None else dummy
        self.pos = positions.to(torch.int32).contiguous() if positions is not None else dummy
        correct = not allow_duplicate_attention  # the duplicate correction reads each token's chunks
        if correct and chunk_of is None:
            ident = torch.arange(length, device=dev, dtype=torch.int32).expand(b, h, length)
            chunk_of = chunk_of_positions(index if index is not None else ident, length, chunk_len)
        self.chunk = chunk_of.to(torch.int32).contiguous() if correct else dummy
        self.n_chunks = self.n if n_chunks is None else n_chunks
        self.chunk_rounds = chunk_of.shape[2] if correct else 1
        self.tiles = tiles_for(chunk_len, d, q.dtype)
        t = self.tiles
        self.meta = dict(
            M=chunk_len,
            D=d,
            SCALE=1.0 / math.sqrt(d),
            BQ=t.bq,
            BK=t.bk,
            BLOCK_D=t.block_d,
            N_CHUNKS_BEFORE=n_chunks_before,
            N_CHUNKS_AFTER=n_chunks_after,
            CAUSAL=causal,
            SELF_MASK=self_mask,
            SHARED=k is None,
            HAS_INDEX=index is not None,
            HAS_KEY_VALID=key_valid is not None,
            HAS_BUCKET=slot_bucket is not None,
            HAS_DOCUMENT_IDS=document_ids is not None,
            HAS_POS=positions is not None,
            ALLOW_DUPLICATE_ATTENTION=allow_duplicate_attention,
            PREC=precision(q.dtype),
            UPCAST=q.dtype != torch.float32 and os.environ.get("TRITON_INTERPRET") == "1",
            num_warps=t.num_warps,
            num_stages=t.num_stages,
        )
        # one program per query (forward, dq) or key (dk, dv) sub-tile of every chunk, per batch row
        self.grid_q = (self.n * triton.cdiv(chunk_len, t.bq), b)
        self.grid_k = (self.n * triton.cdiv(chunk_len, t.bk), b)

    def tensors(self):
        return self.index, self.valid, self.bucket, self.chunk, self.doc, self.pos

    def forward(self, x: CoreInputs):
        return _forward(self, x.q, x.k, x.v)

    def backward(self, x: CoreInputs, out, lse, lse_lo, dout, dlse):
        return _backward(self, x.q, x.k, x.v, out, lse, lse_lo, dout, dlse)


def _forward(call: _Call, q, k, v):
    b, length, h, d, r = call.b, call.length, call.h, call.d, call.r
    out = torch.empty(b, length, h, d, dtype=v.dtype, device=v.device)
    lse = torch.empty(b, length, h, dtype=torch.float32, device=v.device)
    lse_lo = torch.empty_like(lse)
    for head in range(h):
        # per-round results of one head at the queries' positions, then merged: one softmax over the rounds
        o_r = torch.empty(r, b, length, d, dtype=v.dtype, device=v.device)
        m_r = torch.empty(r, b, length, dtype=torch.float32, device=v.device)
        l_r = torch.empty_like(m_r)
        _fwd[call.grid_q](
            q,
            k if k is not None else q,
            v,
            *call.tensors(),
            o_r,
            m_r,
            l_r,
            *q.stride(),
            *_strides(k, q),
            *v.stride(),
            head,
            b,
            length,
            h,
            call.s,
            call.n,
            r,
            call.n_chunks,
            call.chunk_rounds,
            **call.meta,
        )
        mx = m_r.amax(dim=0)
        w = l_r * torch.exp(m_r - mx)  # each round's softmax mass relative to the overall maximum
        den = w.sum(dim=0)
        if r == 1:
            out[:, :, head] = o_r[0]
        else:
            acc = torch.zeros(b, length, d, dtype=torch.float32, device=v.device)
            for i in range(r):
                acc.add_(o_r[i].float() * (w[i] / den).unsqueeze(-1))
            out[:, :, head] = acc
        lse[:, :, head], lse_lo[:, :, head] = split_lse(mx, den)
    return out, lse, lse_lo


def _backward(call: _Call, q, k, v, out, lse, lse_lo, dout, dlse):
    b, length, h, d = call.b, call.length, call.h, call.d
    delta = (dout.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    delta, lse, lse_lo = delta.contiguous(), lse.contiguous(), lse_lo.contiguous()
    grads = [torch.zeros(t.shape, dtype=t.dtype, device=t.device) if t is not None else None for t in (q, k, v)]
    for head in range(h):
        fp32 = q.dtype == torch.float32

        def accumulator(g: Tensor | None) -> Tensor | None:  # fp32 grads accumulate in place, others per head
            if g is None:
                return None
            return g[:, :, head] if fp32 else torch.zeros(b, length, d, dtype=torch.float32, device=q.device)

        acc = [accumulator(g) for g in grads]
        dq, dk, dv = acc
        dk = dq if k is None else dk  # shared-QK: the keys' gradient flows into q
        common = (q, k if k is not None else q, v, *call.tensors(), dout, lse, lse_lo, delta)
        strides = (*q.stride(), *_strides(k, q), *v.stride(), *dout.stride(), *dq.stride())
        sizes = (head, length, h, call.s, call.n, call.r, call.n_chunks, call.chunk_rounds)
        _bwd_dq[call.grid_q](*common, dq, *strides, *sizes, **call.meta)
        _bwd_dkdv[call.grid_k](*common, dk, dv, *strides, *sizes, **call.meta)
        if not fp32:
            for g, a in zip(grads, acc):
                if g is not None:
                    g[:, :, head] = a.to(g.dtype)
    return grads


def chunked_attention_triton(
    q: Tensor,
    k: Tensor | None,
    v: Tensor,
    index: Tensor | None = None,
    *,
    chunk_len: int,
    n_chunks_before: int,
    n_chunks_after: int,
    causal: bool,
    self_mask: bool = True,
    key_valid: Tensor | None = None,
    slot_bucket: Tensor | None = None,
    document_ids: Tensor | None = None,
    allow_duplicate_attention: bool = True,
    positions: Tensor | None = None,
    chunk_of: Tensor | None = None,
    n_chunks: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The contract of ``kernels.chunked_attention``, fused (see the module docstring)."""
    x = CoreInputs(q, k, v, index, key_valid, slot_bucket, document_ids, positions, chunk_of)
    return apply_lean(
        _Call(
            x,
            chunk_len=chunk_len,
            n_chunks_before=n_chunks_before,
            n_chunks_after=n_chunks_after,
            causal=causal,
            self_mask=self_mask,
            allow_duplicate_attention=allow_duplicate_attention,
            n_chunks=n_chunks,
        ),
        x,
    )


def unsupported(q: Tensor, *, chunk_len: int, **_) -> str | None:
    """Why the kernels cannot take this call (None when they can): exactly what the compile check verified."""
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} (the Triton kernels take float32, bfloat16 and float16)"
    if chunk_len > MAX_CHUNK:
        return f"chunk length {chunk_len} > {MAX_CHUNK} (the longest the compile check verifies)"
    if q.shape[-1] > MAX_HEAD:
        return f"head size {q.shape[-1]} > {MAX_HEAD} (the largest the compile check verifies)"
    return None
