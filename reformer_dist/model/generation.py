"""Cached (incremental) generation: the prompt runs once through the model, then each new token attends
through per-layer caches at O(window + buckets) attention work per layer.

Shapes: B batch, H heads, D head size, R hash rounds, nb buckets, t the new token's position (it is the
last of t + 1 tokens), Lp = the padded length the full forward would use for t + 1 tokens, M chunk length,
W = (n_chunks_before + 1) * M window slots per round.

The model's own code runs every step: ``ReformerLM.embed`` one token at position t, then the ordinary
stack with ``AttentionContext.cache`` set, so every attention layer's core call lands in
``GenerationCache.attend``. In the prompt pass that call records the projections and runs the real core;
afterwards it attends the one new token through the layer's cache instead:

- local layers keep a ring of their last W keys/values (exact: a local window is fixed in position);
  full layers keep all keys/values;
- LSH layers keep every token's shared query/key and value, and per round a bucket index: how many
  tokens each bucket holds, and the positions of each bucket's first M and last W tokens. The new token
  is the last of its bucket in the stable (bucket, position) sort, so its rank in round r is
  count(bucket < b) + count(bucket == b); its flat slot is r * Lp + rank, and it attends to every real
  token in the slots of its chunk and the n_chunks_before chunks before it over the concatenated rounds
  (wrapping), exactly the occurrences the chunked forward of t + 1 tokens gives it. Every such slot holds
  one of a bucket's first M or last W tokens, so the index answers it. When the automatic bucket count
  changes with the length, the cached keys are hashed again with the new rotations (O(L), O(log L) times).

What this reproduces and what it approximates is stated in docs/model.md ("Cached generation"): each
token's keys and values are computed once, in the forward where it was the last token (the prompt's
in the prompt pass), while a full recompute would recompute them at every length.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from reformer_dist.kernels.logits import MASK_VALUE, SELF_MASK_VALUE, acc_dtype, normalize_keys, scale_keys
from reformer_dist.model.context import AttentionContext
from reformer_dist.model.hashing import hash_buckets, layer_seed, make_rotations


def sample_next(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """Next token ids [B, 1] from logits [B, V]: greedy for temperature <= 0, else top-k sampling."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)


def _attend_one(
    q: Tensor, keys: Tensor, values: Tensor, hidden: Tensor, is_self: Tensor | None, log_counts: Tensor | None = None
) -> Tensor:
    """One query per (batch, head) over its key occurrences: q [B, H, D], keys/values [B, H, N, D], hidden
    [B, H, N] (never attended), is_self [B, H, N] (the self rule), log_counts [B, H, N] (duplicate correction).
    The same logits as ``kernels.logits.masked_logits``; returns [B, H, D]."""
    dots = torch.einsum("bhd,bhnd->bhn", q, keys).to(acc_dtype(q))
    if log_counts is not None:
        dots = dots - log_counts
    dots = dots.masked_fill(hidden, MASK_VALUE)
    if is_self is not None:
        dots = dots.masked_fill(is_self, SELF_MASK_VALUE)
    return torch.einsum("bhn,bhnd->bhd", torch.softmax(dots, dim=-1).to(values.dtype), values)


def _gather_rows(buf: Tensor, pos: Tensor) -> Tensor:
    """Rows of buf [B, H, L, D] at positions pos [B, H, N] -> [B, H, N, D]."""
    return buf.gather(2, pos.unsqueeze(-1).expand(-1, -1, -1, buf.shape[-1]))


class _LocalCache:
    """Keys/values [B, H, W, D] of a local layer (a ring of the last W positions) or a full layer (every
    position); [B, H, L, D] so that a step gathers contiguous rows."""

    def __init__(self, k: Tensor, v: Tensor, capacity: int, window: int | None):
        b, length, h, d = k.shape
        self.size = capacity if window is None else window
        self.ring = window is not None
        self.k = k.new_zeros(b, h, self.size, d)
        self.v = v.new_zeros(b, h, self.size, v.shape[-1])
        keep = range(max(0, length - self.size), length)  # a ring keeps the last W prompt positions
        slots = torch.tensor([p % self.size for p in keep], dtype=torch.long, device=k.device)
        self.k[:, :, slots] = k[:, keep.start :].transpose(1, 2)
        self.v[:, :, slots] = v[:, keep.start :].transpose(1, 2)

    def step(self, layer: Any, q: Tensor, k: Tensor, v: Tensor, t: int, padded: int) -> Tensor:
        cfg = layer.cfg
        self.k[:, :, t % self.size] = k
        self.v[:, :, t % self.size] = v
        m, before = cfg.local_chunk, cfg.local_n_chunks_before
        if layer.full or padded <= m:  # one chunk: every earlier token
            pos = torch.arange(t + 1, device=q.device)
        else:  # the chunk of t and `before` chunks before it, wrapping over the padded length like the forward
            n = padded // m
            chunks = torch.remainder(torch.arange(t // m - before, t // m + 1, device=q.device), n)
            pos = (chunks[:, None] * m + torch.arange(m, device=q.device)).flatten()
        b, h = q.shape[:2]
        pos = pos.expand(b, h, -1)
        hidden = pos > t  # later positions and padding: causal
        rows = torch.remainder(pos, self.size) if self.ring else pos.clamp(max=t)
        return _attend_one(q, scale_keys(_gather_rows(self.k, rows)), _gather_rows(self.v, rows), hidden, None)


class _LSHCache:
    """Shared queries/keys and values [B, H, L, D] of every token, and per (batch, head, round) a bucket index.

    counts [B, H, R, nb]: tokens per bucket; first [B, H, R, nb*M + 1] and last [B, H, R, nb*W + 1]: positions
    of each bucket's first M tokens and (a ring) its last W tokens; the extra last entry takes masked writes.
    """

    def __init__(self, qk: Tensor, v: Tensor, capacity: int):
        b, length, h, d = qk.shape
        self.qk = qk.new_zeros(b, h, capacity, d)
        self.v = v.new_zeros(b, h, capacity, v.shape[-1])
        self.qk[:, :, :length] = qk.transpose(1, 2)
        self.v[:, :, :length] = v.transpose(1, 2)
        self.factors: list[int] | None = None

    def _rebuild(self, layer: Any, ctx: AttentionContext, t: int, factors: list[int]) -> None:
        """Hash the t cached tokens with the rotations of ``factors`` and index them (O(t), when nb changes)."""
        cfg = layer.cfg
        b, h = self.qk.shape[:2]
        rounds = cfg.n_hashes if ctx.n_hashes is None else ctx.n_hashes
        self.rot = make_rotations(
            layer_seed(ctx.hash_seed, layer.layer_idx),
            cfg.n_heads,
            cfg.d_head,
            rounds,
            factors,
            self.qk.device,
            trained_hashes=cfg.n_hashes,
        )[:h]
        self.factors, self.nb = factors, math.prod(factors)
        self.m, self.w = cfg.chunk_len, (cfg.n_chunks_before + 1) * cfg.chunk_len
        dev = self.qk.device
        self.counts = torch.zeros(b, h, rounds, self.nb, dtype=torch.int32, device=dev)
        self.first = torch.zeros(b, h, rounds, self.nb * self.m + 1, dtype=torch.int32, device=dev)
        self.last = torch.zeros(b, h, rounds, self.nb * self.w + 1, dtype=torch.int32, device=dev)
        if t == 0:
            return
        buckets = hash_buckets(self.qk[:, :, :t].transpose(1, 2), self.rot, factors).long()  # [B,H,R,t]
        self.counts.scatter_add_(-1, buckets, torch.ones_like(buckets, dtype=torch.int32))
        # occurrence number of each token within its bucket (tokens arrive in position order)
        order = torch.sort(buckets, dim=-1, stable=True).indices  # positions in (bucket, position) order
        sorted_b = buckets.gather(-1, order)
        starts = (self.counts.cumsum(-1) - self.counts).long()
        occ = torch.arange(t, device=dev) - starts.gather(-1, sorted_b)
        from_end = self.counts.long().gather(-1, sorted_b) - 1 - occ
        pos = order.to(torch.int32)
        self.first.scatter_(-1, torch.where(occ < self.m, sorted_b * self.m + occ, self.nb * self.m), pos)
        self.last.scatter_(-1, torch.where(from_end < self.w, sorted_b * self.w + occ % self.w, self.nb * self.w), pos)

    def _insert(self, bucket: Tensor, t: int) -> Tensor:
        """Add token t with buckets [B, H, R] (the last of its bucket); return its rank in each round."""
        b = bucket.long().unsqueeze(-1)
        occ = self.counts.gather(-1, b).long()
        rank = self.counts.cumsum(-1).long().gather(-1, b)  # tokens with bucket <= b: t sorts after all of them
        self.counts.scatter_add_(-1, b, torch.ones_like(b, dtype=torch.int32))
        self.first.scatter_(
            -1, torch.where(occ < self.m, b * self.m + occ, self.nb * self.m), torch.full_like(b, t, dtype=torch.int32)
        )
        self.last.scatter_(-1, b * self.w + occ % self.w, torch.full_like(b, t, dtype=torch.int32))
        return rank.squeeze(-1)

    def _window(self, rank: Tensor, n: int, padded: int, n_chunks_before: int) -> tuple[Tensor, Tensor, Tensor]:
        """Positions [B, H, R*W] in the query's window of each round, which are real tokens, and their buckets."""
        b, h, rounds = rank.shape
        m, w, nb = self.m, self.w, self.nb
        dev = rank.device
        s = torch.arange(rounds, device=dev) * padded + rank  # flat slot of the new token in each round
        start = (torch.div(s, m, rounding_mode="floor") - n_chunks_before) * m
        slots = torch.remainder(start.unsqueeze(-1) + torch.arange(w, device=dev), rounds * padded).flatten(-2)
        real = torch.remainder(slots, padded) < n  # the rest is padding (sorted after every real token)
        # which bucket holds each slot: bucket ends over all rounds, offset by the round, are non-decreasing
        counts = self.counts.long()
        ends = (counts.cumsum(-1) + torch.arange(rounds, device=dev).view(rounds, 1) * padded).flatten(-2)
        g = torch.searchsorted(ends, slots, right=True).clamp(max=rounds * nb - 1)  # round * nb + bucket
        cnt = counts.flatten(-2).gather(-1, g)
        occ = slots - (ends.gather(-1, g) - cnt)
        from_end = cnt - 1 - occ
        in_last = from_end < w
        if not (in_last | (occ < m) | ~real).all():  # cannot happen: every window slot is near t or a round end
            raise RuntimeError("LSH generation cache: a window slot is outside the bucket index")
        r_of = torch.div(g, nb, rounding_mode="floor")
        bucket = g - r_of * nb
        last = self.last.flatten(-2)
        first = self.first.flatten(-2)
        row_last = r_of * (nb * w + 1) + bucket * w + occ % w
        row_first = r_of * (nb * m + 1) + bucket * m + occ.clamp(0, m - 1)
        pos = torch.where(in_last, last.gather(-1, row_last), first.gather(-1, row_first)).long()
        return torch.where(real, pos, n - 1), real, bucket

    def step(self, layer: Any, qk: Tensor, v: Tensor, t: int, padded: int, ctx: AttentionContext) -> Tensor:
        cfg = layer.cfg
        self.qk[:, :, t] = qk
        self.v[:, :, t] = v
        b, h = qk.shape[:2]
        if padded <= cfg.chunk_len:  # one chunk: plain attention over every earlier token (the forward's rule)
            pos = torch.arange(t + 1, device=qk.device).expand(b, h, -1)
            keys = normalize_keys(_gather_rows(self.qk, pos))
            return _attend_one(qk, keys, _gather_rows(self.v, pos), torch.zeros_like(pos, dtype=torch.bool), pos == t)
        factors = cfg.bucket_factors(padded)
        if factors != self.factors:
            self._rebuild(layer, ctx, t, factors)
        bucket = hash_buckets(qk.unsqueeze(1), self.rot, factors)[..., 0]  # [B,H,R]
        rank = self._insert(bucket, t)
        pos, real, key_bucket = self._window(rank, t + 1, padded, cfg.n_chunks_before)
        hidden = ~real
        if cfg.same_bucket_only:  # a key occurrence counts only in the round where it shares the query's bucket
            hidden = hidden | (key_bucket != bucket.long().repeat_interleave(self.w, dim=-1))
        log_counts = None
        if not cfg.allow_duplicate_attention:  # subtract log(occurrences of the key over all rounds' windows)
            key = torch.where(real, pos, -1)
            log_counts = (key.unsqueeze(-1) == key.unsqueeze(-2)).sum(-1).to(acc_dtype(qk)).log()
        keys = normalize_keys(_gather_rows(self.qk, pos))
        return _attend_one(qk, keys, _gather_rows(self.v, pos), hidden, (pos == t) & real, log_counts)


class GenerationCache:
    """Per-layer caches of one generation, filled by the prompt pass and extended one token per step.

    Passed to the model through ``AttentionContext.cache`` (never stored on a module). ``capacity`` is the
    number of positions the cache may hold (prompt + new tokens).
    """

    def __init__(self, model: Any, prompt_len: int, capacity: int):
        self.model = model
        self.prompt_len = prompt_len
        self.capacity = capacity
        self.layers: dict[int, _LocalCache | _LSHCache] = {}
        self.pos: int | None = None  # None: the prompt pass; else the position of the token being decoded

    def attend(self, fn: Callable[..., Tensor], *tensors: Tensor, ctx: AttentionContext) -> Tensor:
        """The attention core call of one layer (``fn`` is the layer's bound ``attend``): [B, L, H, D] in/out."""
        layer = fn.__self__  # type: ignore[attr-defined]  # a bound method (see above)
        idx = layer.layer_idx
        lsh = len(tensors) == 2  # LSH layers pass (qk, v); local and full layers (q, k, v)
        if self.pos is None:
            length = self.prompt_len
            if lsh:
                self.layers[idx] = _LSHCache(tensors[0][:, :length], tensors[1][:, :length], self.capacity)
            else:
                window = None if layer.full else (layer.cfg.local_n_chunks_before + 1) * layer.cfg.local_chunk
                self.layers[idx] = _LocalCache(tensors[1][:, :length], tensors[2][:, :length], self.capacity, window)
            return fn(*tensors, ctx)
        t = self.pos
        padded = self.model.padded_length(t + 1)
        cache = self.layers[idx]
        if isinstance(cache, _LSHCache):  # made by the prompt pass above: an LSH cache for an LSH layer
            out = cache.step(layer, tensors[0][:, 0], tensors[1][:, 0], t, padded, ctx)
        else:
            out = cache.step(layer, tensors[0][:, 0], tensors[1][:, 0], tensors[2][:, 0], t, padded)
        return out.unsqueeze(1)


@torch.no_grad()
def generate_cached(
    model: Any,
    prompt_ids: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    hash_seed: int = 0,
    n_hashes: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample ``max_new_tokens`` after ``prompt_ids`` [B, P] with one prompt pass and one cached step per token.

    Returns the ids [B, P + max_new_tokens] and the logits [B, max_new_tokens, V] each new token was drawn
    from. Sampling is ``sample_next`` on float32 logits, as in the full-recompute path, so the same logits
    and generator draw the same tokens.
    """
    cfg = model.cfg
    b, p = prompt_ids.shape
    if p < 1:
        raise ValueError("prompt_ids: cached generation needs at least one prompt token")
    if not cfg.causal:
        raise ValueError(
            "ReformerConfig.causal=False: cached generation needs a causal model "
            "(use_cache=False recomputes the whole context per token)"
        )
    if model.training and cfg.dropout > 0:
        raise ValueError(
            f"ReformerConfig.dropout={cfg.dropout}: the model is in training mode; call model.eval() "
            "before cached generation"
        )
    fed = p + max_new_tokens - 1  # the last new token is never fed back
    if fed > cfg.max_seq_len:
        raise ValueError(
            f"max_new_tokens: prompt ({p}) + max_new_tokens ({max_new_tokens}) - 1 = {fed} positions "
            f"exceed the model's {cfg.max_seq_len} (axial_pos_shape {cfg.axial_pos_shape}); "
            "use_cache=False slides a window over the context instead"
        )
    cache = GenerationCache(model, prompt_len=p, capacity=max(fed, p))
    x, actx, length = model.embed(prompt_ids, hash_seed=hash_seed, n_hashes=n_hashes)
    actx.cache = cache
    x1, x2 = model.stack(x, x, actx)
    ids, scores = [prompt_ids], []
    for i in range(max_new_tokens):
        logits = model.head(x1[:, length - 1 : length], x2[:, length - 1 : length])[:, -1]
        scores.append(logits)
        ids.append(sample_next(logits.float(), temperature, top_k, generator))
        if i == max_new_tokens - 1:
            break
        cache.pos = p + i
        x, actx, length = model.embed(ids[-1], position_offset=p + i, hash_seed=hash_seed, n_hashes=n_hashes)
        actx.cache = cache
        x1, x2 = model.stack(x, x, actx)
    empty = prompt_ids.new_zeros(b, 0, cfg.vocab_size, dtype=model.head.proj.weight.dtype)
    return torch.cat(ids, dim=1), torch.stack(scores, dim=1) if scores else empty
