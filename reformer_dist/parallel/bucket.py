"""LSH-native sequence parallelism: the globally sorted order of every hash round, cut into K equal pieces.

K ranks of a bucket group each hold L/K consecutive tokens. For an LSH layer, each rank hashes its tokens
(global positions, the rotations of one process), and the group learns the global per-(batch, head, round)
bucket counts (all-reduce) and, per bucket, how many tokens earlier ranks hold (an exclusive prefix over
ranks, by recursive doubling): together they give every token its slot in the global stable sort by
(bucket, position), exactly as one process would place it. The R concatenated sorted rounds (R*L slots
per head) are cut into K pieces of R*L/K slots, on chunk boundaries: rank k owns slots [k*R*L/K,
(k+1)*R*L/K) of every head, whatever the bucket sizes (perfect balance, any number of heads). qk, v and
each token's position, bucket and chunks travel to the owner with ``all_to_all_single`` (variable
splits); each rank adds the look-around chunks of its neighbours (halo; rank 0's previous chunks are the
last rank's, wrapping as the single-process chunking wraps), attends over its own chunks with the
attention core in its piece form (``positions``, ``chunk_of``), and sends each result with its
log-sum-exp back with the inverse all-to-all; the token's owner merges its R rounds (one softmax over
their union). Local attention layers exchange halo chunks of q, k, v with their neighbours. Full
attention layers need the whole sequence and are refused.

Everything is autograd-differentiable (the exchanges' backward sends the gradients back), so the
reversible backward's recompute and gradients take the same route. ``bytes_sent`` counts the bytes this
rank hands to collectives (see ``docs/sequence_parallel.md`` for the formula).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from reformer_dist.kernels.backends import Backend
from reformer_dist.kernels.chunked_attention import chunked_attention
from reformer_dist.model.bucket_rules import piece_problem
from reformer_dist.model.hashing import hash_buckets


class BucketSharding:
    """Bucket-sharded attention over one process group (``AttentionContext.bucket``)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        group = group if group is not None else dist.group.WORLD
        if group is None:
            raise RuntimeError("bucket sharding needs a process group: torch.distributed is not initialised")
        self.group = group
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.bytes_sent = 0

    # ------------------------------------------------------------------ collectives
    def _global(self, r: int) -> int:
        return dist.get_global_rank(self.group, r)

    def _exchange(self, x: Tensor, send_splits: list[int], recv_splits: list[int]) -> Tensor:
        """all_to_all_single of rows of x (differentiable); counts the bytes sent."""
        self.bytes_sent += sum(send_splits) * (x[0].numel() * x.element_size() if x.shape[0] else 0)
        return _Exchange.apply(x, send_splits, recv_splits, self.group)

    def _exclusive_prefix(self, x: Tensor) -> Tensor:
        """Sum of x over the ranks before this one (recursive doubling, log2(K) point-to-point steps)."""
        incl, step = x.clone(), 1
        while step < self.size:
            ops, buf = [], None
            if self.rank + step < self.size:
                ops.append(dist.P2POp(dist.isend, incl.clone(), self._global(self.rank + step), self.group))
                self.bytes_sent += incl.numel() * incl.element_size()
            if self.rank - step >= 0:
                buf = torch.empty_like(incl)
                ops.append(dist.P2POp(dist.irecv, buf, self._global(self.rank - step), self.group))
            for req in dist.batch_isend_irecv(ops):
                req.wait()
            if buf is not None:
                incl += buf
            step *= 2
        return incl - x

    def _halo(self, x: Tensor, before: int, after: int) -> Tensor:
        """[B, n, ...] -> [B, before + n + after, ...]: the previous rank's last ``before`` rows and the next rank's
        first ``after`` rows around this rank's own (wrapping: rank 0's previous rank is the last)."""
        k, size = self.rank, self.size
        prev, nxt = (k - 1) % size, (k + 1) % size
        rows = x.transpose(0, 1).reshape(x.shape[1], -1)  # row-major for the exchange: [n, B*...]
        send = [torch.zeros(0, rows.shape[1], dtype=rows.dtype, device=rows.device)] * size
        splits = [0] * size
        parts: dict[int, list[Tensor]] = {}
        # what the next rank needs first (its halo before), then what the previous rank needs (its halo after)
        if before:
            parts.setdefault(nxt, []).append(rows[-before:])
        if after:
            parts.setdefault(prev, []).append(rows[:after])
        for dst, ps in parts.items():
            send[dst] = torch.cat(ps)
            splits[dst] = send[dst].shape[0]
        recv = [0] * size
        recv[prev] += before
        recv[nxt] += after
        got = self._exchange(torch.cat(send), splits, recv)
        offs = [sum(recv[:j]) for j in range(size)]
        head = got[offs[prev] : offs[prev] + before]
        start_next = offs[nxt] + (before if nxt == prev else 0)
        tail = got[start_next : start_next + after]
        ext = torch.cat([head, rows, tail]).view(before + x.shape[1] + after, x.shape[0], *x.shape[2:])
        return ext.transpose(0, 1)

    # ------------------------------------------------------------------ attention
    def lsh(
        self,
        qk: Tensor,
        v: Tensor,
        rotations: Tensor,
        factors: list[int],
        *,
        chunk_len: int,
        n_chunks_before: int,
        n_chunks_after: int,
        causal: bool,
        same_bucket_only: bool = False,
        allow_duplicate_attention: bool = True,
        backend: Backend = "auto",
    ) -> Tensor:
        """LSH attention of this rank's tokens qk, v [B, Lk, H, D] (global positions rank*Lk...) -> [B, Lk, H, D]."""
        b, lk, h, d = qk.shape
        size, r, m = self.size, rotations.shape[2], chunk_len
        length = lk * size
        problem = piece_problem(
            "lsh", lk, size, chunk_len=m, n_chunks_before=n_chunks_before, n_chunks_after=n_chunks_after, n_hashes=r
        )
        if problem:
            raise ValueError(f"bucket-sharded LSH attention: {problem}")
        piece, before, after = r * length // size, n_chunks_before * m, n_chunks_after * m
        # ext = before + piece + after: rows of a rank's piece with its neighbours' look-around chunks
        flat, buckets = self._global_slots(qk, rotations, factors)  # [B,H,R,Lk] each
        route = _Route(self, flat, buckets, piece, before, after, m)
        q_ext, v_ext = route.to_pieces(qk), route.to_pieces(v)  # [B, ext, H, D], own rows in slot order
        ints = route.ints  # [B, ext, H, 2 + R]: position, bucket, the token's flat chunk in every round
        positions = ints[..., 0].transpose(1, 2)
        slot_bucket = ints[..., 1].transpose(1, 2) if same_bucket_only else None
        # [B,H,R,ext]: what the duplicate correction counts
        chunk_of = None if allow_duplicate_attention else ints[..., 2:].permute(0, 2, 3, 1).to(torch.int32)
        out_ext, lse_ext = chunked_attention(
            q_ext,
            None,
            v_ext,
            None,
            chunk_len=m,
            n_chunks_before=n_chunks_before,
            n_chunks_after=n_chunks_after,
            causal=causal,
            self_mask=True,
            slot_bucket=slot_bucket,
            allow_duplicate_attention=allow_duplicate_attention,
            positions=positions,
            chunk_of=chunk_of,
            n_chunks=r * length // m,
            backend=backend,
        )
        del q_ext, v_ext
        own = slice(before, before + piece)
        out_r = route.to_tokens(out_ext[:, own]).view(b, h, r, lk, d)
        lse_r = route.to_tokens(lse_ext[:, own].unsqueeze(-1)).view(b, h, r, lk)
        return _MergeRounds.apply(out_r, lse_r).transpose(1, 2)  # one softmax over the rounds, [B, Lk, H, D]

    def _global_slots(self, qk: Tensor, rotations: Tensor, factors: list[int]) -> tuple[Tensor, Tensor]:
        """(flat slot over the concatenated rounds, bucket) of every (batch, head, round, token), int64 [B,H,R,Lk]:
        the single-process stable sort by (bucket, position), from the group's bucket counts."""
        b, lk, h, _ = qk.shape
        r, nb, dev = rotations.shape[2], math.prod(factors), qk.device
        buckets = hash_buckets(qk, rotations, factors).long()  # [B,H,R,Lk]
        counts = torch.zeros(b, h, r, nb, dtype=torch.int64, device=dev).scatter_add_(
            3, buckets, torch.ones_like(buckets)
        )
        total = counts.clone()
        self.bytes_sent += total.numel() * total.element_size()
        dist.all_reduce(total, group=self.group)
        earlier = self._exclusive_prefix(counts)  # same-bucket tokens of the ranks before this one
        start = torch.cumsum(total, dim=3) - total  # first slot of each bucket in the global order
        _, order = torch.sort(buckets, dim=3, stable=True)  # local stable sort: rank within the bucket
        local_start = torch.cumsum(counts, dim=3) - counts
        within = torch.empty_like(buckets).scatter_(
            3, order, torch.arange(lk, device=dev).expand_as(order) - local_start.gather(3, buckets.gather(3, order))
        )
        slot = start.gather(3, buckets) + earlier.gather(3, buckets) + within  # slot within its round
        return slot + torch.arange(r, device=dev).view(1, 1, r, 1) * (lk * self.size), buckets

    def local(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        chunk_len: int,
        n_chunks_before: int,
        n_chunks_after: int,
        causal: bool,
        backend: Backend = "auto",
    ) -> Tensor:
        """Local attention of this rank's tokens [B, Lk, H, D] with its neighbours' halo chunks."""
        b, lk, h, d = q.shape
        problem = piece_problem(
            "local", lk, self.size, chunk_len=chunk_len, n_chunks_before=n_chunks_before, n_chunks_after=n_chunks_after
        )
        if problem:
            raise ValueError(f"bucket-sharded local attention: {problem}")
        nb_rows, na_rows = n_chunks_before * chunk_len, n_chunks_after * chunk_len
        ext = self._halo(torch.cat([q, k, v], dim=-1), nb_rows, na_rows)
        q_ext, k_ext, v_ext = ext[..., :d], ext[..., d : 2 * d], ext[..., 2 * d :]
        length = lk * self.size
        idx = torch.arange(-nb_rows, lk + na_rows, device=q.device) + self.rank * lk
        positions = torch.remainder(idx, length).expand(b, h, -1)
        out, _ = chunked_attention(
            q_ext,
            k_ext,
            v_ext,
            None,
            chunk_len=chunk_len,
            n_chunks_before=n_chunks_before,
            n_chunks_after=n_chunks_after,
            causal=causal,
            self_mask=False,
            positions=positions,
            backend=backend,
        )
        return out[:, nb_rows : nb_rows + lk]


class _Exchange(torch.autograd.Function):
    """Rows of x to the ranks of a group (variable splits); the backward sends the gradients back.

    (``torch.distributed.nn.functional.all_to_all_single`` takes the output buffer as an input, which keeps
    the sent rows alive in a reference cycle until the garbage collector runs.)
    """

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group) -> Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(
            back, grad.contiguous(), output_split_sizes=ctx.send, input_split_sizes=ctx.recv, group=ctx.group
        )
        return back, None, None, None


class _ScatterRows(torch.autograd.Function):
    """out = zeros(n, E); out[rows] = src. Saves only ``rows`` (``index_copy`` also keeps ``src`` alive)."""

    @staticmethod
    def forward(ctx, src: Tensor, rows: Tensor, n: int) -> Tensor:
        ctx.save_for_backward(rows)
        return src.new_zeros(n, src.shape[1]).index_copy_(0, rows, src)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (rows,) = ctx.saved_tensors
        return grad.index_select(0, rows), None, None


class _MergeRounds(torch.autograd.Function):
    """out = sum_r softmax_r(lse) out_r over the R rounds of every query (dim 2 of [B, H, R, L, D]), in fp32.

    Saves out_r and the fp32 weights (no per-round products); backward: dout_r = w_r dout and
    dlse_r = w_r (<out_r, dout> - sum_s w_s <out_s, dout>).
    """

    @staticmethod
    def forward(ctx, out_r: Tensor, lse_r: Tensor) -> Tensor:
        w = torch.softmax(lse_r.float(), dim=2)  # normalised: exact for a query that sees only itself
        out = torch.zeros(out_r.shape[:2] + out_r.shape[3:], dtype=torch.float32, device=out_r.device)
        for i in range(out_r.shape[2]):
            out.addcmul_(out_r[:, :, i].float(), w[:, :, i].unsqueeze(-1))
        ctx.save_for_backward(out_r, w)
        return out.to(out_r.dtype)

    @staticmethod
    def backward(ctx, dout: Tensor):
        out_r, w = ctx.saved_tensors
        dout = dout.float()
        dots = torch.stack([(out_r[:, :, i].float() * dout).sum(-1) for i in range(out_r.shape[2])], dim=2)
        dlse = w * (dots - (w * dots).sum(dim=2, keepdim=True))
        dout_r = (w.unsqueeze(-1) * dout.unsqueeze(2)).to(out_r.dtype)
        return dout_r, dlse.to(ctx.saved_tensors[1].dtype)


class _Route:
    """Where every (batch, head, round, token) item of an LSH layer goes and how its result comes back.

    An item goes to the owner of its slot; if the slot is among the first ``after`` rows of the owner's
    piece it also goes to the previous rank (the halo after that rank's piece), and if among the last
    ``before`` rows to the next rank (its halo before): one exchange builds every rank's extended piece,
    wrapping from the last rank to rank 0 as the single-process chunking wraps over the rounds. Results
    return from the owners only.
    """

    def __init__(
        self, sh: BucketSharding, flat: Tensor, buckets: Tensor, piece: int, before: int, after: int, chunk_len: int
    ):
        b, h, r, lk = flat.shape
        dev, size = flat.device, sh.size
        self.sh, self.b, self.h, self.r, self.lk = sh, b, h, r, lk
        self.piece, self.ext = piece, before + piece + after
        f = flat.reshape(-1)
        owner, inpiece = torch.div(f, piece, rounding_mode="floor"), f % piece
        items = torch.arange(f.numel(), device=dev)
        dests, rows, picks = [owner], [inpiece + before], [items]
        if after:  # first rows of the owner's piece: the previous rank's halo after its own piece
            sel = inpiece < after
            dests.append((owner[sel] - 1) % size)
            rows.append(inpiece[sel] + before + piece)
            picks.append(items[sel])
        if before:  # last rows of the owner's piece: the next rank's halo before its own piece
            sel = inpiece >= piece - before
            dests.append((owner[sel] + 1) % size)
            rows.append(inpiece[sel] - (piece - before))
            picks.append(items[sel])
        own = torch.arange(sum(x.numel() for x in picks), device=dev) < f.numel()
        dest, row, pick = torch.cat(dests), torch.cat(rows), torch.cat(picks)
        order = torch.argsort(dest, stable=True)
        dest, row, self.pick, own = dest[order], row[order], pick[order], own[order]
        self.send = torch.bincount(dest, minlength=size).tolist()
        self.send_own = torch.bincount(dest[own], minlength=size).tolist()
        self.own_items = self.pick[own]  # items whose results come back, in the order they were sent
        self.recv = (
            sh._exchange(torch.tensor(self.send, device=dev).view(-1, 1), [1] * size, [1] * size).view(-1).tolist()
        )
        # metadata: batch, head, extended row, own?, position, bucket, the token's flat chunk in every round
        bi, hi, _, ti = (x.reshape(-1)[self.pick] for x in _grid(b, h, r, lk, dev))
        self.token_rows = (bi * lk + ti) * h + hi  # rows of [B*Lk*H] the items read
        chunks = torch.div(flat, chunk_len, rounding_mode="floor").permute(0, 1, 3, 2).reshape(b, h, 1, lk, r)
        meta = torch.cat(
            [
                torch.stack([bi, hi, row, own.long(), ti + sh.rank * lk, buckets.reshape(-1)[self.pick]], dim=1),
                chunks.expand(b, h, r, lk, r).reshape(-1, r)[self.pick],
            ],
            dim=1,
        )
        got = sh._exchange(meta, self.send, self.recv)
        gb, gh, grow, gown = got[:, 0], got[:, 1], got[:, 2], got[:, 3].bool()
        self.rows = (gb * self.ext + grow) * h + gh  # rows of the [B, ext, H] extended piece
        self.own_rows = ((gb * piece + grow - before) * h + gh)[gown]  # rows of [B, piece, H] to send back
        src = torch.repeat_interleave(torch.arange(size, device=dev), torch.tensor(self.recv, device=dev))
        self.recv_own = torch.bincount(src[gown], minlength=size).tolist()
        self.ints = (
            torch.zeros(b * self.ext * h, 2 + r, dtype=torch.int64, device=dev)
            .index_copy(0, self.rows, got[:, 4:])
            .view(b, self.ext, h, 2 + r)
        )

    def to_pieces(self, x: Tensor) -> Tensor:
        """[B, Lk, H, D] tokens -> [B, ext, H, D]: the extended piece in slot order (differentiable)."""
        d = x.shape[-1]
        got = self.sh._exchange(x.reshape(-1, d).index_select(0, self.token_rows), self.send, self.recv)
        return _ScatterRows.apply(got, self.rows, self.b * self.ext * self.h).view(self.b, self.ext, self.h, d)

    def to_tokens(self, y: Tensor) -> Tensor:
        """[B, piece, H, E] own results -> [B*H*R*Lk, E] in item order (b, h, r, t) at the tokens' owner."""
        e = y.shape[-1]
        got = self.sh._exchange(y.reshape(-1, e).index_select(0, self.own_rows), self.recv_own, self.send_own)
        return _ScatterRows.apply(got, self.own_items, self.b * self.h * self.r * self.lk)


def forward_bytes(
    kind: str,
    *,
    batch: int,
    heads: int,
    tokens: int,
    head_dim: int,
    elem: int,
    ranks: int,
    rank: int,
    n_hashes: int = 1,
    n_buckets: int = 0,
    chunk_len: int,
    n_chunks_before: int,
    n_chunks_after: int,
) -> int:
    """Bytes one rank hands to collectives in one forward of an LSH or local layer under bucket sharding.

    tokens: this rank's tokens (L/K); heads: the heads it computes (H/U); elem: bytes per qk/v value.
    LSH: bucket counts (all-reduce, then the rank prefix's doubling steps, int64), the split sizes, every
    (batch, head, round, token) item's qk and v and its metadata (6 + R int64: batch, head, row, own, position,
    bucket, its flat chunk in every round) to the owner of its slot, plus the halo copies (the first/last
    chunks of each piece also go to the neighbour: (n_chunks_before + n_chunks_after) x chunk_len rows per batch and
    head per rank on average, exact summed over ranks), and each item's output and fp32 log-sum-exp back.
    Local: the halo chunks of q, k, v. The backward sends each float exchange's gradient once more; the
    reversible backward repeats the forward.
    """
    halo = (n_chunks_before + n_chunks_after) * chunk_len * batch * heads
    if kind == "local":
        return halo * 3 * head_dim * elem
    r = n_hashes
    counts = batch * heads * r * n_buckets * 8
    prefix_steps = sum(1 for i in range(ranks.bit_length()) if 2**i < ranks and rank + 2**i < ranks)
    items = r * batch * heads * tokens
    return (
        counts * (1 + prefix_steps)
        + ranks * 8
        + (items + halo) * (2 * head_dim * elem + (6 + r) * 8)
        + items * (head_dim * elem + 4)
    )


def _grid(b: int, h: int, r: int, lk: int, device) -> list[Tensor]:
    """Index grids (batch, head, round, token) of the [B, H, R, Lk] items, each [B, H, R, Lk] int64."""
    return list(torch.meshgrid(*(torch.arange(n, device=device) for n in (b, h, r, lk)), indexing="ij"))
