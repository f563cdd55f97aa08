"""Verification of a token store: the cheap size check every open does, and the full check
(`reformer-data verify`, and every write before its store replaces one): sizes, SHA-256 of every
shard, token ids within the vocabulary, and the tokenizer model against its identity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from reformer_dist.data.errors import DataError
from reformer_dist.data.manifest import MANIFEST, SPLITS, read_manifest
from reformer_dist.data.tokenizers import SP_PREFIX
from reformer_dist.ondisk import sha256_file

_BLOCK = 1 << 23  # tokens per read when range-checking


def check_sizes(store_dir: str | Path, manifest: dict[str, Any], hint: str = "; run `reformer-data verify`") -> None:
    """Cheap check at open: every shard exists with exactly the size the manifest gives (``hint`` ends the error)."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for s in SPLITS:
        for d in manifest["splits"][s]["shards"]:
            path = Path(store_dir) / d["file"]
            want = d["num_tokens"] * itemsize
            try:
                have = path.stat().st_size
            except OSError:
                raise DataError(f"{path}: shard listed in {MANIFEST} is missing") from None
            if have != want:
                raise DataError(
                    f"{path}: shard is {have} bytes, manifest says {want} ({d['num_tokens']} tokens): "
                    f"truncated or altered{hint}"
                )


def verify_store(store_dir: str | Path) -> dict[str, Any]:
    """Full check: sizes, sha256 of every shard, token ids < vocab_size, tokenizer model checksum.

    Raises DataError listing every bad file; returns the manifest when all is well.
    """
    store_dir = Path(store_dir)
    m = read_manifest(store_dir)
    check_sizes(store_dir, m, hint=" (restore it from a copy, or re-create the store with `reformer-data shard`)")
    problems = []
    dtype, vocab = np.dtype(m["dtype"]), int(m["vocab_size"])
    for s in SPLITS:
        for d in m["splits"][s]["shards"]:
            path = store_dir / d["file"]
            if sha256_file(path) != d["sha256"]:
                problems.append(f"{path}: sha256 mismatch (altered or corrupt)")
                continue
            tokens = np.memmap(path, dtype=dtype, mode="r") if d["num_tokens"] else np.empty(0, dtype)
            for k in range(0, tokens.size, _BLOCK):
                hi = int(tokens[k : k + _BLOCK].max())
                if hi >= vocab:
                    problems.append(f"{path}: token id {hi} >= vocab_size {vocab}")
                    break
            del tokens
    tok_file = m["tokenizer"].get("file")
    if tok_file:
        path = store_dir / tok_file
        if not path.is_file():
            problems.append(f"{path}: tokenizer model listed in {MANIFEST} is missing")
        elif SP_PREFIX + sha256_file(path) != m["tokenizer"]["identity"]:
            problems.append(f"{path}: sha256 does not match tokenizer identity {m['tokenizer']['identity']}")
    if problems:
        raise DataError(f"{store_dir}: verification failed:\n  " + "\n  ".join(problems))
    return m
