"""Memory-lean PyTorch attention core (any device): index-based, blockwise, with its own backward.

The algorithm the fused Triton kernel runs, in PyTorch. Forward walks head groups, then rounds, then
blocks of sorted query chunks; each block gathers its queries and its look-around keys/values straight
from the unsorted [B, L, H, D] tensors through ``index``, computes masked logits, and merges its
normalised output into the unsorted result with a running log-sum-exp (online softmax across rounds),
so neither sorted copies nor per-round outputs ever exist. Saved for backward: q, k (separate keys
only), v, index, out and lse (plus key_valid / slot_bucket when given). Backward recomputes each
block's logits, forms P = exp(logits - lse) of the merged softmax and dS = P * (dP - rowsum(dO*O) +
dlse) (FlashAttention-2), and scatters dq/dk/dv back by index. Activation memory: O(L*H*D); block
temporaries: at most ``block_elems()`` logits (a constant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from reformer_dist.kernels.lean_function import CoreInputs, apply_lean
from reformer_dist.kernels.logits import (
    acc_dtype,
    chunk_of_positions,
    duplicate_counts,
    masked_logits,
    normalize_keys,
    normalize_keys_backward,
    scale_keys,
)

# logits per block (4 MiB in fp32): a block's chain of elementwise passes stays in cache; 2^24-logit blocks page-
# fault and miss cache (peak RSS also stops growing per token from 16K tokens on instead of 128K: RESULTS.md)
_BLOCK_ELEMS = 1 << 20


def block_elems() -> int:
    """Logits per block; read at call time so tests can shrink it."""
    return _BLOCK_ELEMS


@dataclass
class _Call:
    """Sizes and options of one call, and the iteration over (head group, round, chunk block)."""

    b: int
    length: int
    h: int
    d: int
    s: int
    m: int
    n_chunks_before: int
    n_chunks_after: int
    causal: bool
    self_mask: bool
    head_group: int

    @property
    def rounds(self) -> int:
        return self.s // self.length

    @property
    def n_chunks(self) -> int:
        return self.s // self.m

    @property
    def window(self) -> int:
        return (1 + self.n_chunks_before + self.n_chunks_after) * self.m

    def blocks(self, hg: int) -> Iterator[tuple[int, int, int]]:
        """(round, first chunk, end chunk) blocks of one head group; blocks never straddle rounds, so a
        position occurs at most once per block."""
        per_round = self.length // self.m
        per_block = max(1, block_elems() // max(1, self.b * hg * self.m * self.window))
        for r in range(self.rounds):
            for c0 in range(r * per_round, (r + 1) * per_round, per_block):
                yield r, c0, min(c0 + per_block, (r + 1) * per_round)

    def groups(self) -> Iterator[tuple[int, int]]:
        for h0 in range(0, self.h, self.head_group):
            yield h0, min(h0 + self.head_group, self.h)


@dataclass
class _Block:
    """One block's gathered operands: positions, flat rows into [B*L*H] (global) and [B*L*Hg] (group)."""

    pos_q: Tensor  # [B,Hg,nc,M] rows (original positions unless the call gives positions)
    pos_k: Tensor  # [B,Hg,nc,W]
    rows_q: Tensor  # [B,Hg,nc*M] rows of [B*L*H]
    rows_k: Tensor  # [B,Hg,nc,W]
    local_q: Tensor  # rows of the head group's [B*L*Hg] accumulators
    local_k: Tensor
    slot_q: Tensor  # [nc*M] sorted slots of the queries
    slot_k: Tensor  # [nc, W] sorted slots of the keys


def _block(call: _Call, index: Tensor | None, h0: int, h1: int, c0: int, c1: int, device) -> _Block:
    m, nc, hg = call.m, c1 - c0, h1 - h0
    ar = torch.arange(m, device=device)
    chunks = torch.arange(c0, c1, device=device)
    slot_q = (chunks.unsqueeze(1) * m + ar).reshape(-1)
    offsets = torch.arange(-call.n_chunks_before, call.n_chunks_after + 1, device=device)
    win = torch.remainder(chunks.unsqueeze(1) + offsets, call.n_chunks)  # [nc, w] wrapping over all rounds
    slot_k = (win.unsqueeze(-1) * m + ar).reshape(nc, -1)
    if index is None:
        pos_q = slot_q.expand(call.b, hg, -1)
        pos_k = slot_k.expand(call.b, hg, nc, -1)
    else:
        ih = index[:, h0:h1]
        pos_q = ih[:, :, slot_q].long()
        pos_k = ih[:, :, slot_k].long()
    base = (torch.arange(call.b, device=device) * call.length).view(-1, 1, 1)
    head = torch.arange(h0, h1, device=device).view(1, -1, 1)
    rows_q = (base + pos_q) * call.h + head
    rows_k = (base.unsqueeze(-1) + pos_k) * call.h + head.unsqueeze(-1)
    local_q = (base + pos_q) * hg + (head - h0)
    local_k = (base.unsqueeze(-1) + pos_k) * hg + (head - h0).unsqueeze(-1)
    return _Block(pos_q.reshape(call.b, hg, nc, m), pos_k, rows_q, rows_k, local_q, local_k, slot_q, slot_k)


def _rows(x2: Tensor, rows: Tensor, shape: tuple[int, ...]) -> Tensor:
    return x2.index_select(0, rows.reshape(-1)).view(*shape, x2.shape[-1])


def _logits(call: _Call, blk: _Block, q2: Tensor, k2: Tensor | None, masks: "_Masks", h0: int, h1: int):
    """(q block, raw key rows, keys, logits, keep) of one block (``keep``: logits.masked_logits)."""
    b, hg, nc, m = blk.pos_q.shape
    w = blk.pos_k.shape[-1]
    mpos_q, mpos_k = blk.pos_q, blk.pos_k  # positions for the causal and self masks
    if masks.positions is not None:
        mp = masks.positions[:, h0:h1]
        mpos_q, mpos_k = mp[:, :, blk.slot_q].long().view(b, hg, nc, m), mp[:, :, blk.slot_k].long()
    qb = _rows(q2, blk.rows_q, (b, hg, nc, m))
    raw = _rows(q2 if k2 is None else k2, blk.rows_k, (b, hg, nc, w))
    kb = normalize_keys(raw) if k2 is None else scale_keys(raw)
    base = (torch.arange(b, device=q2.device) * call.length).view(-1, 1, 1, 1)
    k_valid = None if masks.key_valid is None else masks.key_valid.reshape(-1)[base + blk.pos_k]
    q_doc = k_doc = None
    if masks.document_ids is not None:
        docs = masks.document_ids.reshape(-1)
        q_doc, k_doc = docs[base + blk.pos_q], docs[base + blk.pos_k]
    q_bucket = k_bucket = None
    if masks.slot_bucket is not None:
        sb = masks.slot_bucket[:, h0:h1]
        q_bucket, k_bucket = sb[:, :, blk.slot_q].view(b, hg, nc, m), sb[:, :, blk.slot_k]
    counts = None
    if masks.chunk_of is not None:
        counts = duplicate_counts(
            blk.pos_q, blk.pos_k, masks.chunk_of[:, h0:h1], call.n_chunks_before, call.n_chunks_after, masks.n_chunks
        )
    dots, keep = masked_logits(
        qb,
        kb,
        mpos_q,
        mpos_k,
        causal=call.causal,
        self_mask=call.self_mask,
        k_valid=k_valid,
        q_bucket=q_bucket,
        k_bucket=k_bucket,
        q_doc=q_doc,
        k_doc=k_doc,
        counts=counts,
    )
    return qb, raw, kb, dots, keep


@dataclass
class _Masks:
    """Per-call mask inputs: key_valid and document_ids [B, L] per row, slot_bucket and positions [B, H, S],
    chunk_of [B, H, R, L] (duplicate correction only) over ``n_chunks`` chunks."""

    key_valid: Tensor | None
    document_ids: Tensor | None
    slot_bucket: Tensor | None
    positions: Tensor | None
    chunk_of: Tensor | None
    n_chunks: int


def _flat(x: Tensor) -> Tensor:
    """[B, L, H, D] -> [B*L*H, D] (a view for the usual contiguous projections)."""
    return x.reshape(-1, x.shape[-1])


class _BlockwiseCore:
    """``LeanCore`` of one call: its sizes and options, and the masks it derives."""

    def __init__(self, call: _Call, allow_duplicate_attention: bool, n_chunks: int | None):
        self.call, self.allow_duplicate_attention, self.n_chunks = call, allow_duplicate_attention, n_chunks

    def masks(self, x: CoreInputs) -> _Masks:
        call, chunk_of = self.call, x.chunk_of
        correct = not self.allow_duplicate_attention  # subtract log(occurrences): chunk_of needed
        if correct and chunk_of is None:
            rows = (
                x.index
                if x.index is not None
                else torch.arange(call.length, device=x.q.device, dtype=torch.int32).expand(call.b, call.h, call.length)
            )
            chunk_of = chunk_of_positions(rows.to(torch.int32), call.length, call.m)
        return _Masks(
            x.key_valid,
            x.document_ids,
            x.slot_bucket,
            x.positions,
            chunk_of if correct else None,
            call.n_chunks if self.n_chunks is None else self.n_chunks,
        )

    def forward(self, x: CoreInputs):
        return _forward(self.call, x.q, x.k, x.v, x.index, self.masks(x))

    def backward(self, x: CoreInputs, out, lse, lse_lo, dout, dlse):
        return _backward(self.call, x.q, x.k, x.v, x.index, self.masks(x), out, lse, lse_lo, dout, dlse)


def split_lse(m: Tensor, den: Tensor) -> tuple[Tensor, Tensor]:
    """log-sum-exp m + log(den) as hi + lo in the accumulation dtype: hi is the rounded value, lo what rounding
    lost. A query that sees only itself has m = -1e5 exactly, where one float32 ulp is 0.008: with hi alone
    exp(logit - lse) would miss 1 by ~1%; with (logit - hi) - lo it is exact (logit - hi is exact, Sterbenz)."""
    log_den = den.log()
    hi = m + log_den
    return hi, (m - hi) + log_den


def _forward(call: _Call, q, k, v, index, masks: _Masks):
    acc = acc_dtype(q)
    q2, k2, v2 = _flat(q), None if k is None else _flat(k), _flat(v)
    out = torch.empty(call.b, call.length, call.h, call.d, dtype=v.dtype, device=v.device)
    lse = torch.empty(call.b, call.length, call.h, dtype=acc, device=v.device)
    lse_lo = torch.empty_like(lse)
    for h0, h1 in call.groups():
        hg = h1 - h0
        whole = hg == call.h and out.dtype == acc
        num = _flat(out) if whole else torch.empty(call.b * call.length * hg, call.d, dtype=acc, device=v.device)
        mx = torch.empty(call.b * call.length * hg, dtype=acc, device=v.device)
        den = torch.empty_like(mx)
        for r, c0, c1 in call.blocks(hg):
            blk = _block(call, index, h0, h1, c0, c1, q.device)
            _, _, _, dots, _ = _logits(call, blk, q2, k2, masks, h0, h1)
            # online softmax over rounds, on unnormalised sums against the running row maximum: exact for a
            # query whose only target is itself (its maximum is the self value, each occurrence weighs 1)
            m_b = dots.amax(dim=-1)
            e = exp_of_shifted(dots.sub_(m_b.unsqueeze(-1)))
            l_b = e.sum(dim=-1).reshape(-1)
            vb = _rows(v2, blk.rows_k, tuple(blk.pos_k.shape))
            ob = torch.matmul(e.to(v.dtype), vb).to(acc).reshape(-1, call.d)
            rows, m_b = blk.local_q.reshape(-1), m_b.reshape(-1)
            if r == 0:  # every position occurs exactly once per round
                num[rows], mx[rows], den[rows] = ob, m_b, l_b
            else:
                m_old = mx[rows]
                m_new = torch.maximum(m_old, m_b)
                a, c = torch.exp(m_old - m_new), torch.exp(m_b - m_new)
                num[rows] = num[rows] * a.unsqueeze(-1) + ob * c.unsqueeze(-1)
                den[rows] = den[rows] * a + l_b * c
                mx[rows] = m_new
        num.div_(den.unsqueeze(-1))
        hi, lo = split_lse(mx, den)
        lse[:, :, h0:h1], lse_lo[:, :, h0:h1] = hi.view(call.b, call.length, hg), lo.view(call.b, call.length, hg)
        if not whole:
            out[:, :, h0:h1] = num.view(call.b, call.length, hg, call.d).to(out.dtype)
    return out, lse, lse_lo


def exp_of_shifted(logits: Tensor) -> Tensor:
    """exp, in place, of logits <= 0 already shifted by their row maximum (or log-sum-exp): the same values as
    ``logits.exp_()``, without CPU exp's slow path.

    ATen's CPU exp of an argument whose result is subnormal or zero (below -87.3 in float32, -708 in float64)
    takes a scalar path 12-30x slower than the vector one, and masked logits (-1e9) are a quarter to a half of
    every causal LSH window. So arguments are raised to a floor first (exp(-87) = 1.6e-38, exp(-700) = 1e-304,
    normal numbers), and every result at most twice exp(floor) is set to 0: masked entries come out exactly 0,
    as before (no gradient reaches another document's tokens), and the only other values that change are below
    ~3e-38 (1e-304), which no row sum >= 1 (the row maximum contributes exp(0)) can tell from 0.
    """
    floor = -700.0 if logits.dtype == torch.float64 else -87.0
    tiny = 2.0 * math.exp(floor)
    return F.threshold_(logits.clamp_min_(floor).exp_(), tiny, 0.0)  # type: ignore[attr-defined]  # not in torch's stubs


def _row_dots(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """rowsum(a * b) in ``acc``, a block of rows at a time (no full-size upcast copies)."""
    out = torch.empty(a.shape[0], dtype=acc, device=a.device)
    rows = max(1, block_elems() // a.shape[1])
    for s in range(0, a.shape[0], rows):
        out[s : s + rows] = (a[s : s + rows].to(acc) * b[s : s + rows].to(acc)).sum(-1)
    return out


def _backward(call: _Call, q, k, v, index, masks: _Masks, out, lse, lse_lo, dout, dlse):
    acc = lse.dtype
    q2, k2, v2 = _flat(q), None if k is None else _flat(k), _flat(v)
    lse2, lo2 = lse.reshape(-1), lse_lo.reshape(-1)
    # delta = rowsum(dO * O) - dlse: dS = P * (dP - delta)
    do2 = _flat(dout)
    delta = _row_dots(do2, _flat(out), acc)
    if dlse is not None:
        delta.sub_(dlse.reshape(-1).to(acc))
    grads = [torch.empty_like(t) if t is not None else None for t in (q, k, v)]
    for h0, h1 in call.groups():
        hg = h1 - h0
        whole = hg == call.h and q.dtype == acc

        def accumulator(g: Tensor | None) -> Tensor | None:
            if g is None:
                return None
            a = _flat(g) if whole else torch.empty(call.b * call.length * hg, call.d, dtype=acc, device=q.device)
            return a.zero_()

        accs = [accumulator(g) for g in grads]
        dq_acc, dk_acc, dv_acc = accs
        assert dq_acc is not None and dv_acc is not None  # q and v always have gradients; k only when not shared
        for _, c0, c1 in call.blocks(hg):
            blk = _block(call, index, h0, h1, c0, c1, q.device)
            qb, raw, kb, dots, keep = _logits(call, blk, q2, k2, masks, h0, h1)
            shape_q = tuple(blk.pos_q.shape)
            rq = blk.rows_q.reshape(-1)
            dots.sub_(lse2[rq].view(shape_q).unsqueeze(-1)).sub_(lo2[rq].view(shape_q).unsqueeze(-1))
            p = exp_of_shifted(dots)
            dob = _rows(do2, blk.rows_q, shape_q).to(acc)
            vb = _rows(v2, blk.rows_k, tuple(blk.pos_k.shape)).to(acc)
            dv_acc.index_add_(0, blk.local_k.reshape(-1), torch.matmul(p.transpose(-1, -2), dob).reshape(-1, call.d))
            ds = torch.matmul(dob, vb.transpose(-1, -2))
            ds.sub_(delta[rq].view(shape_q).unsqueeze(-1)).mul_(p)
            del p
            if keep is not None:  # constants carry no gradient
                ds.mul_(keep)
            dq_acc.index_add_(0, blk.local_q.reshape(-1), torch.matmul(ds, kb.to(acc)).reshape(-1, call.d))
            dkb = torch.matmul(ds.transpose(-1, -2), qb.to(acc))
            if k is None:  # shared QK: the keys' gradient flows into q through the normalisation
                dq_acc.index_add_(0, blk.local_k.reshape(-1), normalize_keys_backward(raw, dkb).reshape(-1, call.d))
            else:
                assert dk_acc is not None
                dk_acc.index_add_(0, blk.local_k.reshape(-1), scale_keys(dkb).reshape(-1, call.d))
        if not whole:
            for g, a in zip(grads, accs):
                if g is not None:
                    assert a is not None
                    g[:, :, h0:h1] = a.view(call.b, call.length, hg, call.d).to(g.dtype)
    return tuple(grads)


def chunked_attention_blockwise(
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
    """The contract of ``chunked_attention``, memory-lean (see the module docstring)."""
    b, length, h, d = q.shape
    s = length if index is None else index.shape[-1]
    # fp32/fp64 accumulate straight into the outputs; half types accumulate in fp32 one head at a time,
    # so the fp32 accumulators stay a fraction of the activations
    head_group = h if acc_dtype(q) == q.dtype else 1
    call = _Call(b, length, h, d, s, chunk_len, n_chunks_before, n_chunks_after, causal, self_mask, head_group)
    q, v = q.contiguous(), v.contiguous()
    k = None if k is None else k.contiguous()
    return apply_lean(
        _BlockwiseCore(call, allow_duplicate_attention, n_chunks),
        CoreInputs(q, k, v, index, key_valid, slot_bucket, document_ids, positions, chunk_of),
    )
