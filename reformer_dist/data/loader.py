"""``WindowLoader``: the trainer's batches: deterministic, resumable, split over DP and SP ranks.

An epoch cuts the split into ``num_windows = (n - 1) // L`` non-overlapping windows of L+1 tokens at
offsets ``shift + k*L`` (``shift`` drawn per epoch in ``[0, n - 1 - num_windows*L]``); consecutive
windows share one token, the label of one's last input. Windows cross document and shard
boundaries. Their order is a keyed pseudo-random permutation of ``range(num_windows)`` (a Feistel
network: O(1) memory, the same on every numpy version), keyed by (seed, epoch).

The global stream of micro-batches takes windows ``[i*D*B, (i+1)*D*B)`` of that order for batch i
(D = dp_size, B = micro_batch); DP rank r takes the r-th block of B. Windows that do not fill a
whole global batch are left out of that epoch (different ones each epoch). Sequence-parallel ranks
of one group get the same windows, rank s the slice ``[s*L/S, (s+1)*L/S)`` of inputs and labels
(reading only those tokens), with ``position_offset = s*L/S``.

Shapes: ``input_ids``/``labels`` are int64 tensors ``[B, L // sp_size]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from reformer_dist.data.errors import DataError
from reformer_dist.data.store import TokenStore

_M64 = (1 << 64) - 1
_STATE_VERSION = 1


def _mix64(x: np.ndarray | int) -> np.ndarray:
    """splitmix64 finaliser: a bijective 64-bit mixing function (vectorised, wraps mod 2^64)."""
    z = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _key(*parts: int) -> int:
    h = 0
    for p in parts:
        h = int(_mix64(h ^ (p & _M64)))
    return h


def permute(index: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """Image of ``index`` (values in [0, n)) under a keyed pseudo-random bijection of ``range(n)``.

    A balanced Feistel network on the smallest even number of bits covering n, with cycle walking
    (re-apply while the result is >= n; the domain is < 4n, so a few rounds at most).
    """
    index = np.asarray(index, dtype=np.uint64)
    if n <= 1:
        return index.astype(np.int64)
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    round_keys = [np.uint64(_key(key, r)) for r in range(rounds)]

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for k in round_keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        return (left << np.uint64(half)) | right

    out = feistel(index)
    walk = out >= n
    while walk.any():
        out[walk] = feistel(out[walk])
        walk = out >= n
    return out.astype(np.int64)


class WindowLoader:
    """Iterates micro-batches ``{"input_ids", "labels", "position_offset"}`` of one rank."""

    def __init__(
        self,
        store: TokenStore,
        split: str = "train",
        seq_len: int = 4096,
        micro_batch: int = 1,
        seed: int = 0,
        dp_rank: int = 0,
        dp_size: int = 1,
        sp_rank: int = 0,
        sp_size: int = 1,
        loop: bool = True,
    ):
        if seq_len < 1 or micro_batch < 1:
            raise ValueError(f"seq_len and micro_batch must be >= 1 (got {seq_len}, {micro_batch})")
        if not 0 <= dp_rank < dp_size or not 0 <= sp_rank < sp_size:
            raise ValueError(
                f"need 0 <= dp_rank < dp_size and 0 <= sp_rank < sp_size "
                f"(got dp {dp_rank}/{dp_size}, sp {sp_rank}/{sp_size})"
            )
        if seq_len % sp_size:
            raise ValueError(f"seq_len {seq_len} is not divisible by sp_size {sp_size}")
        self.store, self.split, self.seq_len, self.micro_batch = store, split, seq_len, micro_batch
        self.dp_rank, self.dp_size, self.sp_rank, self.sp_size = dp_rank, dp_size, sp_rank, sp_size
        self.loop = loop
        self.local_len = seq_len // sp_size
        self.num_tokens = store.num_tokens(split)
        if self.num_tokens < seq_len + 1:
            raise DataError(
                f"{store.name}: split {split!r} has {self.num_tokens} tokens; a window of "
                f"seq_len {seq_len} needs {seq_len + 1}"
            )
        self.num_windows = (self.num_tokens - 1) // seq_len
        global_batch = dp_size * micro_batch
        self.batches_per_epoch = self.num_windows // global_batch  # per rank: steps of one epoch
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{store.name}: split {split!r} has {self.num_tokens} tokens = {self.num_windows} windows of "
                f"seq_len {seq_len}, fewer than one global micro-batch (dp_size {dp_size} x micro_batch "
                f"{micro_batch} = {global_batch} windows, i.e. {global_batch * seq_len + 1} tokens)"
            )
        # Windows all DP ranks together consume per epoch; rank r sees windows_per_epoch // dp_size.
        self.windows_per_epoch = self.batches_per_epoch * global_batch
        self.seed, self.epoch, self.cursor = int(seed), 0, 0  # cursor: windows consumed this epoch

    # ------------------------------------------------------------------ sampling
    def window_offsets(self, epoch: int, windows: np.ndarray) -> np.ndarray:
        """Token offsets of the given positions (in epoch order) of ``epoch``'s windows."""
        key = _key(self.seed, epoch)
        slack = self.num_tokens - 1 - self.num_windows * self.seq_len
        shift = int(_mix64(key ^ 0x5851F42D4C957F2D) % np.uint64(slack + 1))
        return shift + permute(windows, self.num_windows, key) * self.seq_len

    def _batch(self) -> dict[str, Any]:
        first = self.cursor + self.dp_rank * self.micro_batch
        offsets = self.window_offsets(self.epoch, np.arange(first, first + self.micro_batch))
        start = self.sp_rank * self.local_len
        buf = np.empty((self.micro_batch, self.local_len + 1), dtype=self.store.dtype)
        for row, offset in zip(buf, offsets):
            self.store.read(self.split, int(offset) + start, self.local_len + 1, out=row)
        if buf.size and int(buf.max()) >= self.store.vocab_size:  # a damaged shard of the right size
            self._bad_token(buf, offsets, start)
        # numpy converts the strided views in one contiguous copy each (torch's .contiguous() on
        # such views was ~50x slower here)
        return {
            "input_ids": torch.from_numpy(buf[:, :-1].astype(np.int64)),
            "labels": torch.from_numpy(buf[:, 1:].astype(np.int64)),
            "position_offset": start,
        }

    def _bad_token(self, buf: np.ndarray, offsets: np.ndarray, start: int) -> None:
        """DataError naming the shard that holds a token id outside the store's vocabulary."""
        row, col = np.argwhere(buf >= self.store.vocab_size)[0]
        index = int(offsets[row]) + start + int(col)
        raise DataError(
            f"{self.store.shard_name(self.split, index)}: token id {int(buf[row, col])} at {self.split} token {index} "
            f"is outside the vocabulary 0..{self.store.vocab_size - 1} of {self.store.name}: the shard is corrupt or "
            f"was altered; run `reformer-data verify {self.store.name}`"
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            if self.cursor >= self.windows_per_epoch:
                self.epoch, self.cursor = self.epoch + 1, 0
                if not self.loop:
                    return
            batch = self._batch()
            self.cursor += self.dp_size * self.micro_batch  # state = "after this batch", before yielding
            yield batch

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: load it into a loader of the same split and seq_len to go on."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "split": self.split,
            "seq_len": self.seq_len,
            "num_tokens": self.num_tokens,
            "identity": self.store.identity,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where the saved loader stopped. DP size and micro-batch may change if the saved
        position is a whole number of the new global batches."""
        mine = {
            "split": self.split,
            "seq_len": self.seq_len,
            "num_tokens": self.num_tokens,
            "identity": self.store.identity,
        }
        for k, have in mine.items():
            if state.get(k) != have:
                raise DataError(
                    f"{self.store.name}: loader state is for {k}={state.get(k)!r}, this loader has {have!r}: "
                    "resuming would not continue the same sequence of windows"
                )
        global_batch = self.dp_size * self.micro_batch
        if state["cursor"] % global_batch:
            raise DataError(
                f"loader state cursor {state['cursor']} is not a multiple of dp_size x micro_batch = {global_batch}"
            )
        self.seed, self.epoch, self.cursor = int(state["seed"]), int(state["epoch"]), int(state["cursor"])
