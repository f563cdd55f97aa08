"""Tokens/s of WindowLoader at seq_len 4K, 64K and 1M on a synthetic store written to a temp folder.

    python benchmarks/loader_throughput.py [--tokens 16777216] [--seconds 2]

Measures what the trainer pays per micro-batch: window sampling, memory-mapped reads across shard
boundaries (the shards are in the page cache, as on a warm node), int64 conversion, the torch tensors.
Prints one line per seq_len; writes nothing outside the temp folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from reformer_dist.data.loader import WindowLoader
from reformer_dist.data.store import TokenStore
from reformer_dist.data.tokenizers import ByteTokenizer
from reformer_dist.data.writer import ShardWriter

CASES = [(4096, 8), (65536, 2), (1 << 20, 1)]  # (seq_len, micro_batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1 << 24, help="synthetic store size (tokens)")
    ap.add_argument("--shard-tokens", type=int, default=1 << 22)
    ap.add_argument("--seconds", type=float, default=2.0, help="time per case")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        with ShardWriter(tmp, ByteTokenizer(), args.shard_tokens) as w:
            for k in range(0, args.tokens, 1 << 22):
                w.add("train", rng.integers(0, 257, size=min(1 << 22, args.tokens - k), dtype=np.uint16))
        store = TokenStore.open(tmp)
        print(
            f"store: {store.num_tokens('train'):,} tokens in {store.num_shards('train')} shards of "
            f"{args.shard_tokens:,} ({store.dtype.name})"
        )
        for seq_len, micro_batch in CASES:
            loader = WindowLoader(store, seq_len=seq_len, micro_batch=micro_batch, seed=0)
            it = iter(loader)
            next(it)  # warm-up
            batches, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < args.seconds:
                next(it)
                batches += 1
            tok_s = batches * micro_batch * seq_len / elapsed
            print(
                f"seq_len {seq_len:>9,}  micro_batch {micro_batch}  {tok_s / 1e6:8.1f}M tokens/s  "
                f"({elapsed / batches * 1e3:.2f} ms/batch)"
            )


if __name__ == "__main__":
    main()
