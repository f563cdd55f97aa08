"""Predicted H100 time of one bf16 training step, op by op, from the model's own shapes (issue 21). A prediction,
not a measurement.

The step is the one ``benchmarks/train_step.py`` times for ``ours`` on CUDA: fp32 weights and fp32 residual streams,
bf16 autocast, the Triton attention core, batch 1; forward (no grad, reversible), then the reversible backward, which
recomputes every layer (G chunk by chunk, then F) before backpropagating it, then the chunked LM head + loss, whose
backward recomputes each chunk; optionally AdamW (fused, fp32 weights = the master copy). Every op that runs is
counted from the config (``ReformerConfig``: layers, widths, heads, chunk lengths, rounds, the bucket rule
``bucket_factors``, hashing's block size, ff/loss chunking): tensor-core FLOPs, other FLOPs, exponentials, HBM bytes
and kernel launches.

Times (assumptions, stated because they decide the answer), per op, then summed (ops run one after another):
- roofline (pure): max(FLOPs / 790e12, bytes / 3.35e12): H100 SXM bf16 dense matmul as measured (targets.md) and
  HBM3 bandwidth; every FLOP (exp and elementwise included) at the matmul peak.
- adjusted: max(matmul / (790e12 x eff) + other FLOPs / 67e12 + exp / 3.9e12, bytes / (3.35e12 x 0.8),
  launches x 5 us). eff = 0.7 for cuBLAS GEMMs with thousands of rows, 0.25 for the Triton attention kernels (64 x 64
  tiles, 1-2 key chunks per program, rows gathered through the permutation, no warp specialisation; FlashAttention-2
  reaches ~35% at head size 64 with long key loops); 67 TFLOP/s is the fp32 CUDA-core peak and 3.9e12/s the
  special-function (exp) rate of an H100 SXM (FlashAttention-3 paper), both serialised with the matmuls as Triton
  schedules them; 80% of HBM bandwidth for streaming and 128-byte-row gathers; 5 us of host time per eager PyTorch
  op or Triton launch (the GPU idles when kernels are shorter than that; one op's host time does not overlap
  another's GPU time here, which is pessimistic where long and short ops alternate).
- ``--gpu h200``: the same with 4.8 TB/s of HBM.
- L2 (50 MB) is ignored: a key chunk read by two query programs is counted twice (what the kernel loads), and
  tensors that would stay in L2 (per-head temporaries at short L) are counted as HBM traffic.
- An op's bytes are what it reads and writes once (a fp32 atomic add: read + write); bias adds ride in the GEMM
  epilogue; the LayerNorm backward reads x and dy twice (dx, then the weight gradients).
- Hashing under autocast: the einsum runs as a bf16 bmm (autocast casts the fp32 operands), per block of
  ``hashing._HASH_BLOCK_ELEMS`` rotated values, 24 ops per block with two bucket factors.
- Sorting (torch.sort, stable, int32 keys, CUDA): PyTorch's dispatch (``launch_stable_sort_kernel``): fewer than 128
  rows of < 1M -> one cub radix sort of (key, (row, index)) pairs plus a 1-pass sort of the row ids and a gather;
  1M or more -> one cub radix sort of (key, int64 index) pairs per row. cub onesweep: 8-bit digits over all 32 key
  bits (PyTorch passes the full bit range) = 4 passes, each reading and writing keys and values, plus one histogram
  pass over the keys.
Checked on CPU (tests/unit/test_predict_step.py): matmul FLOPs equal torch's FLOP counter on the real model (with
the blockwise core's 9 logit-sized matmuls per layer in place of the kernels' 11), hashing's ops equal what
``hash_buckets`` dispatches (bytes within 1%), and a real step's dispatched bytes match the count within 2% per phase.

    python benchmarks/predict_step.py                           # bench config, 16K..4M tokens, per-op tables
    python benchmarks/predict_step.py --config configs/million_1gpu.toml --json pred.json
    python benchmarks/predict_step.py --compare steps.json --gpu auto   # predicted vs measured (train_step.py --json)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_step.py is a sibling script, not a package module
import torch  # noqa: E402

from reformer_dist.model import hashing  # noqa: E402
from reformer_dist.model.config import ReformerConfig  # noqa: E402
from reformer_dist.ondisk import atomic_write  # noqa: E402
from train_step import BENCH, PEAK_BF16_TFLOPS, axial_shape, model_flops  # noqa: E402

PEAK_FLOPS = PEAK_BF16_TFLOPS * 1e12
HBM_BYTES_S = 3.35e12
# HBM bandwidth per GPU the suite may run on (same bf16 peak: an H200 is an H100 with more and faster HBM)
GPU_HBM = {"h100": HBM_BYTES_S, "h200": 4.8e12}
VECTOR_FLOPS = 67e12
EXP_PER_S = 3.9e12
LAUNCH_S = 5e-6
BW_EFF = 0.8
MM_EFF = {"gemm": 0.7, "attention": 0.25}
TARGET_TOK_S = 1.5e6
LENGTHS = (16384, 65536, 262144, 1048576, 4194304)
E = 2  # bytes of a bf16 value
F4 = 4  # bytes of an fp32 value (streams, statistics, accumulators)

PHASES = ("forward", "recompute", "backward", "optimizer")
# terms in table order
TERMS = (
    "projections (qk/q,k,v, out)",
    "feed-forward",
    "hashing (rotations + argmax)",
    "sort (argsort per round)",
    "attention core (Triton kernels)",
    "attention glue (round merge, delta, grad casts)",
    "layer norms + bf16 casts",
    "residual streams (add, sub, casts)",
    "embeddings",
    "LM head + loss",
    "weight casts + grad accumulation",
    "dropout",
    "AdamW (fused, fp32)",
)
CUTS = {
    "attention core (Triton kernels)": "one fused backward kernel (the logits are formed 3x in backward, 4x with the "
    "recompute, dO.V^T twice), skip causally masked sub-tiles, pipelined larger tiles",
    "attention glue (round merge, delta, grad casts)": "merge the rounds inside the forward kernel, compute delta in "
    "the dq kernel and write bf16 gradients from the kernels (its PyTorch elementwise passes move more than the "
    "kernels)",
    "hashing (rotations + argmax)": "one kernel for rotation + argmax that never writes the rotated values (their "
    "columns grow with sqrt(L)); a fixed n_buckets keeps the cost per token flat; bigger hash blocks cut launches",
    "sort (argsort per round)": "sort only log2(n_buckets)+1 key bits (2 radix passes, not 4), all heads and rounds in "
    "one call with int32 indices",
    "projections (qk/q,k,v, out)": "already GEMMs: FP8, or fuse the qk/v projections into one [D, 2d] GEMM",
    "feed-forward": "FP8 GEMMs, the activation in the GEMM epilogue, LayerNorm + cast in its prologue (the "
    "reversible recompute adds 1/3)",
    "layer norms + bf16 casts": "fuse LayerNorm with the bf16 cast (and the recipe recompute of the norm output)",
    "residual streams (add, sub, casts)": "fuse the stream add/sub into the epilogue of the output GEMMs",
    "LM head + loss": "a fused linear + cross-entropy kernel (logits never reach HBM)",
    "weight casts + grad accumulation": "a larger ff_chunk_len; accumulate dW in fp32 inside the GEMM (beta = 1)",
    "embeddings": "negligible",
    "dropout": "fuse into the neighbouring GEMM epilogues",
    "AdamW (fused, fp32)": "negligible",
}


class Cost:
    """What some ops cost: a list of ops, each (tensor-core FLOPs, other FLOPs, exponentials, HBM bytes, kernel
    launches, matmul efficiency). Sums concatenate; times are per op, then summed (ops run one after another)."""

    __slots__ = ("ops",)

    def __init__(
        self,
        mm: float = 0.0,
        vec: float = 0.0,
        exp: float = 0.0,
        bytes: float = 0.0,
        launches: float = 0.0,
        eff: float = MM_EFF["gemm"],
        *,
        ops: list[tuple] | None = None,
    ):
        if ops is not None:
            self.ops = ops
        else:
            self.ops = [(mm, vec, exp, bytes, launches, eff)] if any((mm, vec, exp, bytes, launches)) else []

    def __add__(self, o: "Cost") -> "Cost":
        return Cost(ops=self.ops + o.ops)

    def __mul__(self, k: float) -> "Cost":
        return Cost(ops=[(a * k, b * k, c * k, d * k, e * k, f) for a, b, c, d, e, f in self.ops])

    __rmul__ = __mul__

    def _sum(self, i: int) -> float:
        return sum(op[i] for op in self.ops)

    mm = property(lambda self: self._sum(0))
    vec = property(lambda self: self._sum(1))
    exp = property(lambda self: self._sum(2))
    bytes = property(lambda self: self._sum(3))
    launches = property(lambda self: self._sum(4))

    @property
    def flops(self) -> float:
        return self.mm + self.vec + self.exp

    def merged(self, launches: float | None = None, eff: float | None = None) -> "Cost":
        """One op doing all of this (one kernel, or uniform ops whose times add up the same)."""
        e = eff if eff is not None else (self.ops[0][5] if self.ops else MM_EFF["gemm"])
        return Cost(self.mm, self.vec, self.exp, self.bytes, self.launches if launches is None else launches, e)

    def totals(self) -> dict[str, float]:
        return {"mm": self.mm, "vec": self.vec, "exp": self.exp, "bytes": self.bytes, "launches": self.launches}

    def roofline_s(self, hbm: float = HBM_BYTES_S) -> float:
        """Pure roofline per op: every FLOP at the bf16 matmul peak, every byte at the HBM peak (bytes/s)."""
        return sum(max((mm + vec + ex) / PEAK_FLOPS, nb / hbm) for mm, vec, ex, nb, _, _ in self.ops)

    def adjusted_s(self, hbm: float = HBM_BYTES_S) -> float:
        """Per op: the stated matmul efficiency, the CUDA-core and exp rates, 80% of HBM, the host launch floor."""
        return sum(
            max(mm / (PEAK_FLOPS * eff) + vec / VECTOR_FLOPS + ex / EXP_PER_S, nb / (hbm * BW_EFF), n * LAUNCH_S)
            for mm, vec, ex, nb, n, eff in self.ops
        )


def ew(read: float, write: float, vec: float = 0.0, launches: float = 1.0, exp: float = 0.0) -> Cost:
    """An elementwise/reduction op: bytes read and written."""
    return Cost(vec=vec, exp=exp, bytes=read + write, launches=launches)


def gemm(m: float, k: float, n: float, launches: float = 1.0) -> Cost:
    """[m, k] @ [k, n] in bf16 with a bf16 result (fp32 accumulation inside)."""
    return Cost(mm=2.0 * m * k * n, bytes=E * (m * k + k * n + m * n), launches=launches)


def linear_fwd(n: float, d_in: int, d_out: int) -> Cost:
    return gemm(n, d_in, d_out)


def linear_bwd(n: float, d_in: int, d_out: int) -> Cost:
    """dX = dY W and dW = dY^T X."""
    return gemm(n, d_out, d_in) + gemm(d_out, n, d_in)


def layer_norm(n: float, width: int, out_bytes: int = F4) -> Cost:
    return ew(F4 * n * width, out_bytes * n * width, vec=8.0 * n * width)


def layer_norm_bwd(n: float, width: int) -> Cost:
    """dx (reads x and dy) and the weight/bias gradients (a second read of both)."""
    return ew(4 * F4 * n * width, F4 * n * width, vec=12.0 * n * width, launches=2)


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


# ---------------------------------------------------------------------------------------------- attention core
@dataclass(frozen=True)
class CoreShape:
    """One call of the attention core: B, L, H, head size, chunk, window chunks, rounds and flags."""

    b: int
    length: int
    h: int
    d: int
    chunk: int
    window: int  # key chunks per query chunk: 1 + n_chunks_before + n_chunks_after
    rounds: int
    shared_qk: bool
    has_index: bool
    causal: bool
    self_mask: bool


def _mask_ops(s: CoreShape) -> int:
    """CUDA-core ops per logit for the masks and the softmax bookkeeping (_scores + online softmax)."""
    return 5 + 2 * s.causal + 3 * s.self_mask


def core_kernels(s: CoreShape) -> dict[str, Cost]:
    """The three Triton kernels (``triton_lsh._fwd``, ``_bwd_dq``, ``_bwd_dkdv``), all heads: programs x per-program.

    Tiles are the kernels' own (``triton_lsh.tiles_for``): a chunk is cut into query sub-tiles of bq rows and key
    sub-tiles of bk, head size padded to a power of two >= 16. FLOPs are what the tiles execute; bytes what the
    masked loads read: each query sub-tile reads the whole key window, each key sub-tile (dk, dv) every query
    sub-tile of its windows. Rows are read through the int32 permutation, one index per row.
    """
    from reformer_dist.kernels.triton_lsh import tiles_for  # imports triton: only where the kernels are counted

    t = tiles_for(s.chunk, s.d, torch.bfloat16)
    nq, nk = -(-s.chunk // t.bq), -(-s.chunk // t.bk)
    pq, pk, bd = nq * t.bq, nk * t.bk, t.block_d  # padded query and key extents of a chunk
    m, w, dd = s.chunk, s.window, s.d
    ib = 4 if s.has_index else 0
    row = m * dd * E  # one chunk of q, k, v or dO rows of one head
    tile = 2.0 * pq * pk * bd  # one chunk's [q, D] x [D, k] products over all its sub-tiles
    progs = s.rounds * s.length // m * s.b * s.h  # chunks (each nq or nk programs)
    key_prep = (4 if s.shared_qk else 1) * pk * bd * nq  # RMS-normalise (shared QK) or scale, per query sub-tile
    fwd = Cost(
        mm=w * 2 * tile,
        vec=w * (_mask_ops(s) * pq * pk + key_prep + 2 * pq * bd * nk) + pq * bd,
        exp=w * (pq * pk + pq * nk),
        bytes=m * ib + row + w * (m * ib + 2 * row) * nq + row + 2 * m * F4,
        launches=0,
    )
    dq = Cost(
        mm=w * 3 * tile,
        vec=w * ((_mask_ops(s) + 5) * pq * pk + key_prep),
        exp=w * pq * pk,
        bytes=m * ib + 2 * row + 3 * m * F4 + w * (m * ib + 2 * row) * nq + m * dd * 2 * F4,
        launches=0,
    )
    dkdv = Cost(
        mm=w * 4 * tile,
        vec=w * (_mask_ops(s) + 6) * pq * pk + key_prep / nq + (8 * pk * bd if s.shared_qk else 0),
        exp=w * pq * pk,
        bytes=(
            m * ib
            + 2 * row
            + w * (m * ib + 2 * row + 3 * m * F4) * nk
            + 2 * m * dd * 2 * F4
            + (row if s.shared_qk else 0)
        ),
        launches=0,
    )  # shared QK: raw key rows read again at the end
    # fp32 atomics (dq, dk, dv) are counted as a read and a write of 4 bytes each
    att = MM_EFF["attention"]
    return {
        name: (c * progs).merged(launches=s.h, eff=att)
        for name, c in (("_fwd", fwd), ("_bwd_dq", dq), ("_bwd_dkdv", dkdv))
    }


def core_glue(s: CoreShape) -> dict[str, Cost]:
    """PyTorch ops around the kernels (``triton_lsh._forward`` / ``_backward``), all heads."""
    bt, r, dd = s.b * s.length, s.rounds, s.d
    # forward, per head: merge the rounds' (m, l) into the lse and the rounds' outputs into one
    stats = (
        ew(F4 * r * bt, F4 * bt)
        + ew(F4 * (r + 1) * bt, F4 * r * bt)
        + ew(F4 * r * bt, F4 * r * bt, exp=r * bt)
        + ew(2 * F4 * r * bt, F4 * r * bt)
        + ew(F4 * r * bt, F4 * bt)  # amax, sub, exp, mul, sum
        + ew(F4 * bt, F4 * bt, exp=bt)
        + 3 * ew(2 * F4 * bt, F4 * bt)  # split_lse: log, add, sub, add
        + 2 * ew(F4 * bt, F4 * bt)
    )  # lse[:, :, head], lse_lo[:, :, head]
    if r == 1:
        outs = ew(E * bt * dd, E * bt * dd)
    else:
        per_round = (
            ew(E * bt * dd, F4 * bt * dd)
            + ew(2 * F4 * bt, F4 * bt)
            + ew(F4 * bt * (dd + 1), F4 * bt * dd)
            + ew(2 * F4 * bt * dd, F4 * bt * dd)
        )  # .float(), w / den, multiply, add_
        outs = ew(0, F4 * bt * dd) + r * per_round + ew(F4 * bt * dd, E * bt * dd)  # zeros, rounds, out[:, :, head]
    fwd = (stats + outs) * s.h
    n_acc = 2 if s.shared_qk else 3  # gradient accumulators per head: dq (+ dk), dv
    btd = bt * dd * s.h
    delta = ew(E * btd, F4 * btd) * 2 + ew(2 * F4 * btd, F4 * btd) + ew(F4 * btd, F4 * btd / dd)
    zeros = ew(0, E * btd) * n_acc
    per_head = ew(0, F4 * bt * dd) * n_acc + (ew(F4 * bt * dd, E * bt * dd) + ew(E * bt * dd, E * bt * dd)) * n_acc
    return {"forward": fwd, "backward": delta + zeros + per_head * s.h}


# ---------------------------------------------------------------------------------------------- hashing and sort
def hashing_cost(b: int, length: int, h: int, d: int, rounds: int, factors: list[int]) -> Cost:
    """One ``hash_buckets`` call (+ ``make_rotations``): blocks of ``hashing._HASH_BLOCK_ELEMS`` rotated values.

    The einsum runs in fp32 whatever the autocast (``hash_buckets`` disables it: a bf16 run hashes as fp32 does), as
    an fp32 bmm; the argmax of each factor is a max and a min over its columns plus a few [B, H, R, l] integer ops.
    """
    cols = sum(f // 2 for f in factors)
    step = max(1, hashing._HASH_BLOCK_ELEMS // max(1, b * h * rounds * cols))
    blocks = math.ceil(length / step)
    n, btd, bthr = b * length, b * length * h * d, b * length * h * rounds
    rot = h * d * rounds * cols
    c = ew(0, F4 * rot, launches=2)  # randn rotations
    elementwise = ew(E * btd, F4 * btd)  # .float() of the block (the rotations are fp32 already)
    # the [H, l, D] operand of the bmm is a strided batch: no copy
    bmm = Cost(
        mm=2.0 * n * h * d * rounds * cols, bytes=F4 * btd + F4 * rot * blocks + F4 * bthr * cols, launches=blocks
    )
    elementwise = elementwise + ew(0, F4 * bthr) + ew(F4 * bthr, F4 * bthr)  # zeros accumulator, out[..., s:e] = acc
    for f in factors:
        half = f // 2
        elementwise = elementwise + 2 * ew(F4 * bthr * half, (F4 + 8) * bthr, vec=bthr * half)  # max, min (+ index)
        # -lo, >=, arg_lo + n
        elementwise = elementwise + ew(F4 * bthr, F4 * bthr) + ew(2 * F4 * bthr, bthr) + ew(8 * bthr, 8 * bthr)
        elementwise = (
            elementwise
            + ew(17 * bthr, 8 * bthr)
            + ew(8 * bthr, 4 * bthr)
            + ew(4 * bthr, 4 * bthr)
            + ew(8 * bthr, 4 * bthr)
        )  # where, .to(int32), scale *, acc +=
    # per block: .float(), zeros, store and 9 ops per factor (+ the bmm)
    return c + bmm + elementwise.merged(launches=(3 + 9 * len(factors)) * blocks)


def sort_cost(b: int, h: int, rounds: int, length: int) -> Cost:
    """``sort_buckets``: one stable torch.sort of [B, H, L] int32 per round (assumptions: module docstring)."""
    nseg, n = b * h, b * h * length
    radix = 4 * 24 + 4  # 4 onesweep passes reading and writing 4 B keys + 8 B values, one histogram pass
    per_round = ew(4 * n, 4 * n)  # the round's non-contiguous slice made contiguous
    if nseg == 1 or length >= 1_000_000:  # one cub radix sort of (key, int64 index) per row
        per_round = per_round + ew(0, 8 * length) + Cost(bytes=radix * n, launches=6 * nseg)
    elif nseg < 128:  # full sort of (key, (row, index)), then a 1-pass sort of the row ids, then a gather
        per_round = per_round + ew(0, 8 * n) + Cost(bytes=radix * n, launches=6) + Cost(bytes=24 * n, launches=3)
        per_round = per_round + ew(8 * n + 4 * n, 8 * n + 4 * n)
    else:  # cub segmented radix sort
        per_round = per_round + ew(0, 8 * n) + Cost(bytes=radix * n, launches=6)
    per_round = per_round + ew(8 * n, 4 * n)  # perm[..., r*L:(r+1)*L] = order (int64 -> int32)
    return per_round * rounds


# ---------------------------------------------------------------------------------------------- the step
class StepCount:
    """All ops of one training step of ``cfg`` at ``length`` tokens (batch ``batch``): cost per (term, phase)."""

    def __init__(
        self, cfg: ReformerConfig, length: int, batch: int = 1, optimizer: bool = True, hbm: float = HBM_BYTES_S
    ):
        self.cfg, self.batch, self.optimizer, self.hbm = cfg, batch, optimizer, hbm
        self.length = length
        self.padded = self._padded(length)
        self.terms: dict[str, dict[str, Cost]] = {t: {p: Cost() for p in PHASES} for t in TERMS}
        self.factors = cfg.bucket_factors(self.padded)
        self._count()

    def _padded(self, length: int) -> int:
        """``ReformerLM.padded_length``: a multiple of the chunk lengths unless the sequence fits the shortest."""
        cfg = self.cfg
        lens = [cfg.chunk_len if t == "lsh" else cfg.local_chunk for t in cfg.attn_layers if t != "full"]
        if length <= (min(lens) if lens else 1):
            return length
        mult = cfg.pad_multiple()
        return -(-length // mult) * mult

    def add(self, term: str, phase: str, cost: Cost) -> None:
        self.terms[term][phase] = self.terms[term][phase] + cost

    # ------------------------------------------------------------------ parameters
    def matmul_weights(self) -> dict[str, int]:
        """Weight-matrix parameters of the projections, the feed-forward and the head (biases excluded)."""
        c = self.cfg
        inner = c.n_heads * c.d_head
        proj = sum((2 if t == "lsh" else 3) * c.d_model * inner + inner * c.d_model for t in c.attn_layers)
        return {
            "projections": proj,
            "feed-forward": 2 * c.n_layers * c.d_model * c.d_ff,
            "head": 2 * c.d_model * c.vocab_size,
        }

    def n_params(self) -> int:
        """``ReformerLM.num_parameters()`` of this config, counted from the shapes."""
        c = self.cfg
        w = self.matmul_weights()
        norms = c.n_layers * 2 * 2 * c.d_model + 2 * 2 * c.d_model
        biases = c.n_layers * (c.d_ff + c.d_model)
        (a, b), (d1, d2) = c.axial_pos_shape, c.axial_pos_dims
        emb = c.vocab_size * c.d_model + a * d1 + b * d2
        return sum(w.values()) + norms + biases + emb

    # ------------------------------------------------------------------ counting
    def _count(self) -> None:
        c, b, t = self.cfg, self.batch, self.padded
        n, dm = b * t, c.d_model
        self._embeddings(n)
        for kind in c.attn_layers:
            for phase in ("forward", "recompute"):
                self._attention_block(kind, phase)
                self._ff_block(phase)
            self._attention_block_backward(kind)
            self._ff_block_backward()
            # autocast caches weight casts within one autocast region: once in the forward, per G chunk and per
            # F recompute in the backward (each opens its own region)
            inner = c.n_heads * c.d_head
            attn_w = ((2 if kind == "lsh" else 3) + 1) * dm * inner
            ff_w = 2 * dm * c.d_ff
            n_ff = len(self._ff_chunks())
            self.add(
                "weight casts + grad accumulation", "forward", ew(F4 * (attn_w + ff_w), E * (attn_w + ff_w), launches=4)
            )
            self.add(
                "weight casts + grad accumulation",
                "recompute",
                ew(F4 * (attn_w + n_ff * ff_w), E * (attn_w + n_ff * ff_w), launches=4 + 2 * n_ff),
            )
            # dW (bf16) -> fp32, then accumulated into .grad (the first chunk's is taken as is)
            self.add(
                "weight casts + grad accumulation",
                "backward",
                ew(E * (attn_w + n_ff * ff_w), F4 * (attn_w + n_ff * ff_w), launches=4 + 2 * n_ff)
                + ew(2 * F4 * (n_ff - 1) * ff_w, F4 * (n_ff - 1) * ff_w, launches=2 * (n_ff - 1)),
            )
        self._head(n)
        if self.optimizer:
            p = self.n_params()
            self.add("AdamW (fused, fp32)", "optimizer", Cost(vec=16.0 * p, bytes=28.0 * p, launches=4))

    def _ff_chunks(self) -> list[int]:
        t, step = self.padded, self.cfg.ff_chunk_len if self.cfg.ff_chunk_len > 0 else self.padded
        return [min(step, t - s) for s in range(0, t, step)]

    def _dropout(self, phase: str, n: float, width: int, nbytes: int) -> None:
        if self.cfg.dropout > 0:
            self.add("dropout", phase, ew(nbytes * n * width, (nbytes + 1) * n * width))

    def _embeddings(self, n: int) -> None:
        c = self.cfg
        dm = c.d_model
        d1, d2 = c.axial_pos_dims
        fwd = ew(8 * n, F4 * n * dm) + ew(8 * n, 8 * n) * 2 + ew(8 * n, F4 * n * d1) + ew(8 * n, F4 * n * d2)
        fwd = fwd + ew(F4 * n * dm, F4 * n * dm) + ew(2 * F4 * n * dm, F4 * n * dm)  # cat, tok + pos
        fwd = fwd + ew(0, 8 * n) + ew(8 * n, 8 * n) + 2 * ew(F4 * n * dm, F4 * n * dm)  # positions, clamp, 2 streams
        fwd = fwd + ew(8 * n, n) + ew(n, 8)  # labels != -100, count
        self.add("embeddings", "forward", fwd)
        self._dropout("forward", n, dm, F4)
        # dx = dy1 + dy2 (both streams start as the embeddings); embedding and index backward: a sort of the ids
        # (one radix pass over log2(rows) bits: 8 + 8 B per id, twice) and a segmented sum of the gradient rows
        bwd = ew(2 * F4 * n * dm, F4 * n * dm)
        for width in (dm, d1, d2):
            bwd = bwd + Cost(bytes=2 * 16 * n + 8 * n, launches=6)
            bwd = bwd + ew(F4 * n * width + 8 * n, F4 * n * width, launches=3)
        self.add("embeddings", "backward", bwd)
        self._dropout("backward", n, dm, F4)

    def _core_shape(self, kind: str) -> CoreShape:
        c, t = self.cfg, self.padded
        if kind == "lsh":
            if t <= c.chunk_len:  # one chunk: plain attention, no hashing
                return CoreShape(self.batch, t, c.n_heads, c.d_head, t, 1, 1, True, False, c.causal, True)
            return CoreShape(
                self.batch,
                t,
                c.n_heads,
                c.d_head,
                c.chunk_len,
                1 + c.n_chunks_before + c.n_chunks_after,
                c.n_hashes,
                True,
                True,
                c.causal,
                True,
            )
        m = min(c.local_chunk, t)
        w = 1 + c.local_n_chunks_before + c.local_n_chunks_after if t > c.local_chunk else 1
        return CoreShape(self.batch, t, c.n_heads, c.d_head, m, w, 1, False, False, c.causal, False)

    def _full_attention(self, phase: str) -> None:
        """``full`` layers: SDPA (FlashAttention), O(L^2): forward 2 matmuls, backward 5 (causal half computed)."""
        c, b, t = self.cfg, self.batch, self.padded
        frac = 0.5 if c.causal else 1.0
        pair = 2.0 * b * c.n_heads * t * t * c.d_head * frac
        btd = b * t * c.n_heads * c.d_head
        if phase == "backward":
            self.add(
                "attention core (Triton kernels)",
                phase,
                Cost(mm=5 * pair, exp=pair / c.d_head / 2, bytes=E * btd * 8, launches=3, eff=MM_EFF["attention"]),
            )
        else:
            self.add(
                "attention core (Triton kernels)",
                phase,
                Cost(mm=2 * pair, exp=pair / c.d_head / 2, bytes=E * btd * 4, launches=2, eff=MM_EFF["attention"]),
            )

    def _attention_block(self, kind: str, phase: str) -> None:
        """F in the forward (no grad) or its recompute in the reversible backward: LayerNorm -> projections ->
        hashing -> sort -> core -> merge -> out projection -> stream update."""
        c, b, t = self.cfg, self.batch, self.padded
        n, dm, inner = b * t, c.d_model, c.n_heads * c.d_head
        self.add("layer norms + bf16 casts", phase, layer_norm(n, dm) + ew(F4 * n * dm, E * n * dm))
        n_in = 2 if kind == "lsh" else 3
        self.add("projections (qk/q,k,v, out)", phase, n_in * linear_fwd(n, dm, inner) + linear_fwd(n, inner, dm))
        if kind == "full":
            self._full_attention(phase)
        else:
            s = self._core_shape(kind)
            if s.has_index:
                self.add(
                    "hashing (rotations + argmax)",
                    phase,
                    hashing_cost(b, t, c.n_heads, c.d_head, c.n_hashes, self.factors),
                )
                self.add("sort (argsort per round)", phase, sort_cost(b, c.n_heads, c.n_hashes, t))
            self.add("attention core (Triton kernels)", phase, core_kernels(s)["_fwd"])
            self.add("attention glue (round merge, delta, grad casts)", phase, core_glue(s)["forward"])
        self._dropout(phase, n, dm, E)
        if phase == "forward":
            self.add("residual streams (add, sub, casts)", phase, ew((F4 + E) * n * dm, F4 * n * dm))  # y1.add_(F)
        else:
            # fo = F(x2).to(fp32); y1.sub_(fo)
            self.add(
                "residual streams (add, sub, casts)",
                phase,
                ew(E * n * dm, F4 * n * dm) + ew(2 * F4 * n * dm, F4 * n * dm),
            )

    def _ff_block(self, phase: str) -> None:
        """G chunk by chunk: LayerNorm -> cast -> dense -> activation -> dense -> stream update."""
        c = self.cfg
        dm, ff = c.d_model, c.d_ff
        for t_c in self._ff_chunks():
            n = self.batch * t_c
            self.add("layer norms + bf16 casts", phase, layer_norm(n, dm) + ew(F4 * n * dm, E * n * dm))
            self.add(
                "feed-forward",
                phase,
                linear_fwd(n, dm, ff) + ew(E * n * ff, E * n * ff, vec=n * ff) + linear_fwd(n, ff, dm),
            )
            self._dropout(phase, n, ff, E)
            self._dropout(phase, n, dm, E)
            if phase == "forward":  # y2[:, s:e].add_(G)
                self.add("residual streams (add, sub, casts)", phase, ew((F4 + E) * n * dm, F4 * n * dm))
            else:  # gc = G(y1).to(fp32)
                self.add("residual streams (add, sub, casts)", phase, ew(E * n * dm, F4 * n * dm))

    def _ff_block_backward(self) -> None:
        c = self.cfg
        dm, ff = c.d_model, c.d_ff
        for t_c in self._ff_chunks():
            n = self.batch * t_c
            # dy2 -> bf16, out and dense backward, ReLU backward, bias gradients, dX -> fp32
            self.add("residual streams (add, sub, casts)", "backward", ew(F4 * n * dm, E * n * dm))
            self.add(
                "feed-forward",
                "backward",
                linear_bwd(n, ff, dm)
                + linear_bwd(n, dm, ff)
                + ew(2 * E * n * ff, E * n * ff, vec=n * ff)
                + ew(E * n * dm, E * dm)
                + ew(E * n * ff, E * ff),
            )
            self._dropout("backward", n, ff, E)
            self._dropout("backward", n, dm, E)
            self.add("layer norms + bf16 casts", "backward", ew(E * n * dm, F4 * n * dm) + layer_norm_bwd(n, dm))
            # y2.sub_(gc); dy1.add_(y1c.grad)
            self.add("residual streams (add, sub, casts)", "backward", 2 * ew(2 * F4 * n * dm, F4 * n * dm))

    def _attention_block_backward(self, kind: str) -> None:
        c, b, t = self.cfg, self.batch, self.padded
        n, dm, inner = b * t, c.d_model, c.n_heads * c.d_head
        n_in = 2 if kind == "lsh" else 3
        self.add("residual streams (add, sub, casts)", "backward", ew(F4 * n * dm, E * n * dm))  # dy1 -> bf16
        self._dropout("backward", n, dm, E)
        self.add("projections (qk/q,k,v, out)", "backward", linear_bwd(n, inner, dm) + n_in * linear_bwd(n, dm, inner))
        if kind == "full":
            self._full_attention("backward")
        else:
            s = self._core_shape(kind)
            k = core_kernels(s)
            self.add("attention core (Triton kernels)", "backward", k["_bwd_dq"] + k["_bwd_dkdv"])
            self.add("attention glue (round merge, delta, grad casts)", "backward", core_glue(s)["backward"])
        # the input projections' dX summed; the norm output rebuilt from its recipe for each projection's dW;
        # its cast's backward; LayerNorm backward; dy2.add_(x2c.grad)
        self.add("projections (qk/q,k,v, out)", "backward", ew((n_in * E) * n * dm, E * n * dm, launches=n_in - 1))
        self.add(
            "layer norms + bf16 casts",
            "backward",
            n_in * (layer_norm(n, dm) + ew(F4 * n * dm, E * n * dm))
            + ew(E * n * dm, F4 * n * dm)
            + layer_norm_bwd(n, dm),
        )
        self.add("residual streams (add, sub, casts)", "backward", ew(2 * F4 * n * dm, F4 * n * dm))

    def _head(self, n: int) -> None:
        """``_ChunkedHeadLoss``: per chunk cat -> LayerNorm(2D) -> bf16 -> logits -> fp32 -> cross-entropy; the
        backward recomputes each chunk and backpropagates it."""
        c = self.cfg
        k, v = 2 * c.d_model, c.vocab_size
        total = self.padded
        chunks = [min(c.loss_chunk_len, total - s) for s in range(0, total, c.loss_chunk_len)]
        for phase in ("forward", "backward"):
            for t_c in chunks:
                m = self.batch * t_c
                f = ew(F4 * m * k, F4 * m * k) + layer_norm(m, k) + ew(F4 * m * k, E * m * k)  # cat, norm, cast
                f = f + ew(F4 * k * v, E * k * v) + linear_fwd(m, k, v) + ew(E * m * v, F4 * m * v)  # weight, logits
                f = f + ew(F4 * m * v, F4 * m * v, vec=4 * m * v, exp=m * v) + ew(F4 * m + 8 * m, F4 * m)  # CE
                self.add("LM head + loss", phase, f)
                self._dropout(phase, m, k, F4)
                if phase == "backward":
                    g = ew(8 * m, F4 * m * v, launches=2) + ew(2 * F4 * m * v, F4 * m * v, vec=3 * m * v)  # nll, lsm
                    g = g + ew(F4 * m * v, E * m * v) + linear_bwd(m, k, v)  # cast back, dh and dW
                    g = g + ew(E * k * v, F4 * k * v) + ew(2 * F4 * k * v, F4 * k * v)  # dW -> fp32, accumulate
                    g = g + ew(E * m * k, F4 * m * k) + layer_norm_bwd(m, k)  # dh -> fp32, LayerNorm backward
                    g = g + 2 * ew(F4 * m * k, F4 * m * k)  # the two halves of cat's gradient into g1, g2
                    self.add("LM head + loss", phase, g)
                    self._dropout(phase, m, k, F4)

    # ------------------------------------------------------------------ results
    def term_totals(self) -> dict[str, Cost]:
        return {name: sum(phases.values(), Cost()) for name, phases in self.terms.items()}

    def total(self, optimizer: bool | None = None) -> Cost:
        with_opt = self.optimizer if optimizer is None else optimizer
        return sum(
            (cost for name, cost in self.term_totals().items() if with_opt or not name.startswith("AdamW")), Cost()
        )

    def step_seconds(self, adjusted: bool, optimizer: bool | None = None) -> float:
        with_opt = self.optimizer if optimizer is None else optimizer
        out = 0.0
        for name, cost in self.term_totals().items():
            if name.startswith("AdamW") and not with_opt:
                continue
            out += cost.adjusted_s(self.hbm) if adjusted else cost.roofline_s(self.hbm)
        return out

    def mfu_flops(self) -> float:
        """train_step.py's MFU numerator for this config (its attention term counts LSH and local windows alike)."""
        c = self.cfg
        window = (1 + c.n_chunks_before + c.n_chunks_after) * c.chunk_len
        return model_flops(
            self.n_params(),
            self.length * self.batch,
            layers=c.n_layers,
            hashes=c.n_hashes,
            heads=c.n_heads,
            d_head=c.d_head,
            window=window,
        )

    def summary(self, optimizer: bool = False) -> dict:
        """Step seconds, tokens/s and MFU (pure roofline and adjusted); fwd+bwd unless ``optimizer``."""
        out = {
            "length": self.length,
            "batch": self.batch,
            "padded": self.padded,
            "params": self.n_params(),
            "bucket_factors": self.factors,
            "optimizer": optimizer,
        }
        for label, adj in (("roofline", False), ("adjusted", True)):
            sec = self.step_seconds(adj, optimizer)
            out[f"{label}_step_s"] = sec
            out[f"{label}_tok_s"] = self.length * self.batch / sec
            out[f"{label}_mfu"] = self.mfu_flops() / sec / PEAK_FLOPS
        return out

    def table(self) -> list[dict]:
        rows = []
        for name, cost in self.term_totals().items():
            if cost.bytes == 0 and cost.flops == 0:
                continue
            rows.append(
                {
                    "term": name,
                    **cost.totals(),
                    "flops": cost.flops,
                    "roofline_s": cost.roofline_s(self.hbm),
                    "adjusted_s": cost.adjusted_s(self.hbm),
                }
            )
        return rows

    def largest(self, k: int = 3, adjusted: bool = True) -> list[str]:
        key = "adjusted_s" if adjusted else "roofline_s"
        return [r["term"] for r in sorted(self.table(), key=lambda r: -r[key])[:k]]


# ---------------------------------------------------------------------------------------------- configs and CLI
def bench_config(length: int) -> ReformerConfig:
    """The bench config exactly as ``train_step.build_ours`` builds it for ``length`` tokens."""
    b = BENCH
    return ReformerConfig(
        vocab_size=b["vocab"],
        d_model=b["d_model"],
        n_heads=b["heads"],
        d_head=b["d_head"],
        d_ff=b["d_ff"],
        n_layers=b["layers"],
        n_hashes=b["hashes"],
        chunk_len=b["chunk"],
        axial_pos_shape=axial_shape(length),
        ff_chunk_len=16384,
        loss_chunk_len=16384,
    )


def predict(
    length: int, config: ReformerConfig | None = None, batch: int = 1, optimizer: bool = True, gpu: str = "h100"
) -> StepCount:
    """Count one step of ``config`` (default: the bench config for ``length``) at ``length`` tokens on ``gpu``."""
    cfg = bench_config(length) if config is None else config
    if length > cfg.max_seq_len:
        raise ValueError(
            f"--lengths: {length} tokens exceed the config's axial_pos_shape {cfg.axial_pos_shape} "
            f"(max {cfg.max_seq_len} tokens)"
        )
    return StepCount(cfg, length, batch, optimizer, GPU_HBM[gpu])


def _fmt_k(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.0f}K"


def print_step(s: StepCount) -> None:
    total_adj = s.step_seconds(True, optimizer=True)
    print(f"\nL = {s.length} (padded {s.padded}), batch {s.batch}, buckets {s.factors}, params {s.n_params()}")
    print("| term | GFLOP (matmul) | GFLOP (other + exp) | GB | launches | roofline ms | adjusted ms | share |")
    print("|---|---|---|---|---|---|---|---|")
    for r in s.table():
        print(
            f"| {r['term']} | {r['mm'] / 1e9:.1f} | {(r['vec'] + r['exp']) / 1e9:.1f} | {r['bytes'] / 1e9:.2f} | "
            f"{r['launches']:.0f} | {r['roofline_s'] * 1e3:.2f} | {r['adjusted_s'] * 1e3:.2f} | "
            f"{r['adjusted_s'] / total_adj:.0%} |"
        )
    t = s.total(optimizer=True)
    print(
        f"| total (with AdamW) | {t.mm / 1e9:.1f} | {(t.vec + t.exp) / 1e9:.1f} | {t.bytes / 1e9:.2f} | "
        f"{t.launches:.0f} | {s.step_seconds(False, True) * 1e3:.2f} | {total_adj * 1e3:.2f} | |"
    )
    print("three largest (adjusted): " + "; ".join(f"{n}: {CUTS[n]}" for n in s.largest()))
    print("three largest (roofline): " + ", ".join(s.largest(adjusted=False)))


def print_summary(steps: list[StepCount]) -> list[dict]:
    rows = [s.summary(optimizer=False) for s in steps]
    gpu = next(k for k, v in GPU_HBM.items() if v == steps[0].hbm).upper() if steps else "H100"
    print(f"\nPredicted {gpu} step (forward + backward, no optimizer: what train_step.py times; a prediction)")
    print(
        "| L | roofline ms | roofline tok/s | roofline MFU | adjusted ms | adjusted tok/s | adjusted MFU | "
        "adjusted vs 1.5M tok/s | + AdamW ms (adj.) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for s, r in zip(steps, rows):
        print(
            f"| {s.length} | {r['roofline_step_s'] * 1e3:.1f} | {_fmt_k(r['roofline_tok_s'])} | "
            f"{r['roofline_mfu']:.2f} | {r['adjusted_step_s'] * 1e3:.1f} | {_fmt_k(r['adjusted_tok_s'])} | "
            f"{r['adjusted_mfu']:.2f} | {r['adjusted_tok_s'] / TARGET_TOK_S:.2f} | "
            f"{s.step_seconds(True, True) * 1e3:.1f} |"
        )
    return rows


def compare(path: Path, config: ReformerConfig | None, system: str = "ours", gpu: str = "h100") -> list[dict]:
    """Predicted next to measured tokens/s for the rows of ``train_step.py --json`` (system ``ours``)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--compare {path}: cannot read train_step.py's JSON ({e})") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or any(
        not isinstance(r, dict) or not {"system", "length", "tok_s"} <= r.keys() for r in rows
    ):
        raise SystemExit(
            f"--compare {path}: expected {{'rows': [{{'system', 'length', 'tok_s', ...}}]}} "
            "as benchmarks/train_step.py --json writes"
        )
    out = []
    print(f"\nPredicted ({gpu.upper()}, no optimizer) vs measured ({data.get('device', '?')}), system {system}")
    print("| L | measured tok/s | predicted roofline | predicted adjusted | measured / adjusted | measured MFU |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["system"] != system:
            continue
        s = predict(int(r["length"]), config, gpu=gpu).summary(optimizer=False)
        rec = {
            "length": r["length"],
            "measured_tok_s": r["tok_s"],
            "roofline_tok_s": s["roofline_tok_s"],
            "adjusted_tok_s": s["adjusted_tok_s"],
            "measured_over_adjusted": r["tok_s"] / s["adjusted_tok_s"],
            "measured_mfu": r.get("mfu"),
        }
        out.append(rec)
        print(
            f"| {r['length']} | {r['tok_s']:.0f} | {s['roofline_tok_s']:.0f} | {s['adjusted_tok_s']:.0f} | "
            f"{rec['measured_over_adjusted']:.2f} | {r.get('mfu', float('nan')):.3f} |"
        )
    if not out:
        print(f"(no rows of system {system!r})")
    return out


def load_model_config(path: str) -> tuple[ReformerConfig, int, int]:
    """[model], data.seq_len and train.micro_batch of a run config (validated by the trainer's own loader)."""
    from reformer_dist.training.config import load_run_config

    run = load_run_config(path)
    return run.model, run.data.seq_len, run.train.micro_batch


def detect_gpu() -> str:
    """h200 when this machine's first CUDA device is one, else h100 (the prediction's default)."""
    import torch

    return "h200" if torch.cuda.is_available() and "H200" in torch.cuda.get_device_name(0) else "h100"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--config",
        help="a run config (TOML): predict its [model] at data.seq_len, train.micro_batch "
        "(one GPU: sequence-parallel communication is not modelled)",
    )
    ap.add_argument(
        "--lengths",
        help="comma-separated token counts (default: 16K..4M for the bench config, data.seq_len with --config)",
    )
    ap.add_argument("--batch", type=int, help="sequences per step (default 1, or train.micro_batch with --config)")
    ap.add_argument("--compare", help="train_step.py --json output: print predicted next to measured tok/s")
    ap.add_argument(
        "--gpu",
        choices=["h100", "h200", "auto"],
        default="h100",
        help="HBM bandwidth: h100 3.35 TB/s, h200 4.8 TB/s (same bf16 peak); auto = this machine's GPU",
    )
    ap.add_argument("--json", help="write every count, table and summary here")
    ap.add_argument("--quiet", action="store_true", help="summary only (no per-op tables)")
    args = ap.parse_args(argv)
    config, lengths, batch = None, list(LENGTHS), 1
    if args.config:
        config, seq_len, batch = load_model_config(args.config)
        lengths = [seq_len]
    if args.lengths:
        try:
            lengths = [int(x) for x in args.lengths.split(",")]
        except ValueError:
            raise SystemExit(f"--lengths {args.lengths!r}: expected comma-separated integers") from None
        if any(x < 1 for x in lengths):
            raise SystemExit(f"--lengths {args.lengths!r}: expected positive integers")
    if args.batch is not None:
        if args.batch < 1:
            raise SystemExit(f"--batch {args.batch}: expected a positive integer")
        batch = args.batch
    gpu = detect_gpu() if args.gpu == "auto" else args.gpu
    result: dict = {
        "gpu": gpu,
        "assumptions": {
            "peak_bf16_flops": PEAK_FLOPS,
            "hbm_bytes_s": GPU_HBM[gpu],
            "vector_flops": VECTOR_FLOPS,
            "exp_per_s": EXP_PER_S,
            "launch_s": LAUNCH_S,
            "bw_efficiency": BW_EFF,
            "matmul_efficiency": MM_EFF,
        },
        "config": args.config or "bench (train_step.py BENCH)",
        "target_tok_s": TARGET_TOK_S,
    }
    if args.compare:
        result["compare"] = compare(Path(args.compare), config, gpu=gpu)
    else:
        try:
            steps = [predict(x, config, batch, gpu=gpu) for x in lengths]
        except ValueError as e:
            raise SystemExit(str(e)) from None
        if not args.quiet:
            for s in steps:
                print_step(s)
        result["summary"] = print_summary(steps)
        result["steps"] = [
            {
                "length": s.length,
                "table": s.table(),
                "largest": s.largest(),
                "largest_roofline": s.largest(adjusted=False),
                "phases": {t: {p: c.totals() for p, c in ph.items()} for t, ph in s.terms.items()},
            }
            for s in steps
        ]
    if args.json:
        atomic_write(args.json, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
