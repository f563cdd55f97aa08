"""The token store's manifest format: what a store folder holds, split by split, shard by shard.

A store is a folder (its file names are defined in reformer_dist/ondisk.py)::

    manifest.json            written last: its presence means the store is complete
    train-00000.bin ...      raw little-endian uint16 (uint32 when vocab_size > 65536) token ids
    validation-00000.bin ...
    tokenizer.model          SentencePiece stores only: the model, so the store decodes by itself

Shards are flat: documents follow each other, each ended by the tokenizer's end-of-document id, and
a document may continue into the next shard. Written by data/writer.py, checked by data/verify.py.

Manifest (``FORMAT``)::

    {"format", "dtype", "vocab_size", "eod_id",
     "tokenizer": {"identity", "file"},
     "splits": {"train": {"num_tokens", "num_documents",
                          "shards": [{"file", "num_tokens", "num_documents", "sha256"}, ...]},
                "validation": {...}},
     "metadata": {...}}       # how it was made: sources, options
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from reformer_dist.data.errors import DataError
from reformer_dist.data.tokenizers import Tokenizer
from reformer_dist.ondisk import STORE_MANIFEST as MANIFEST

FORMAT = "reformer_dist.token_store/1"
SPLITS = ("train", "validation")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds ids 0..vocab_size-1."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def make_manifest(
    tokenizer: Tokenizer,
    shards: dict[str, list[dict[str, Any]]],
    metadata: dict[str, Any],
    tokenizer_file: str | None = None,
) -> dict[str, Any]:
    """The manifest of a store whose shard entries (file, num_tokens, num_documents, sha256) are given."""
    return {
        "format": FORMAT,
        "dtype": dtype_for_vocab(tokenizer.vocab_size).name,
        "vocab_size": tokenizer.vocab_size,
        "eod_id": tokenizer.eod_id,
        "tokenizer": {"identity": tokenizer.identity, "file": tokenizer_file},
        "splits": {
            s: {
                "num_tokens": sum(d["num_tokens"] for d in shards[s]),
                "num_documents": sum(d["num_documents"] for d in shards[s]),
                "shards": shards[s],
            }
            for s in SPLITS
        },
        "metadata": metadata,
    }


def read_manifest(store_dir: str | Path) -> dict[str, Any]:
    """Load and sanity-check ``store_dir/manifest.json``."""
    path = Path(store_dir) / MANIFEST
    if not path.is_file():
        why = (
            f"no {MANIFEST}: not a token store, or its write did not finish"
            if Path(store_dir).is_dir()
            else "no such folder"
        )
        raise DataError(f"{path}: {why}")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable manifest: {e}") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise DataError(f"{path}: format {got!r}, expected {FORMAT!r}")
    try:
        _check_fields(m, path)
        if np.dtype(m["dtype"]) != dtype_for_vocab(int(m["vocab_size"])):
            raise DataError(f"{path}: dtype {m['dtype']} does not match vocab_size {m['vocab_size']}")
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: malformed manifest (missing {e})") from e
    return m


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_fields(m: dict[str, Any], path: Path) -> None:
    """Types and ranges of every field a reader relies on: DataError naming the field and what it must be
    (a hand-edited manifest otherwise reads as a wrong store: a string count, a negative size, a shard
    file outside the folder)."""

    def bad(field: str, want: str, got: Any) -> DataError:
        return DataError(f"{path}: {field}: expected {want}, got {got!r}")

    if not _count(m["vocab_size"]) or m["vocab_size"] < 1:
        raise bad("vocab_size", "an integer >= 1", m["vocab_size"])
    if not _count(m["eod_id"]) or m["eod_id"] >= m["vocab_size"]:
        raise bad("eod_id", f"an integer in [0, vocab_size={m['vocab_size']})", m["eod_id"])
    if not isinstance(m["dtype"], str):
        raise bad("dtype", "'uint16' or 'uint32'", m["dtype"])
    tok = m["tokenizer"]
    if not isinstance(tok, dict) or not isinstance(tok["identity"], str) or not tok["identity"]:
        raise bad(
            "tokenizer.identity",
            "the tokenizer's identity string",
            tok.get("identity") if isinstance(tok, dict) else tok,
        )
    if tok.get("file") is not None and (not isinstance(tok["file"], str) or Path(tok["file"]).name != tok["file"]):
        raise bad("tokenizer.file", "null or a file name inside the store", tok["file"])
    for s in SPLITS:
        split = m["splits"][s]
        for key in ("num_tokens", "num_documents"):
            if not _count(split[key]):
                raise bad(f"splits.{s}.{key}", "an integer >= 0", split[key])
        if not isinstance(split["shards"], list):
            raise bad(f"splits.{s}.shards", "a list", split["shards"])
        for i, d in enumerate(split["shards"]):
            where = f"splits.{s}.shards[{i}]"
            if not isinstance(d, dict):
                raise bad(where, "an object", d)
            if not isinstance(d["file"], str) or Path(d["file"]).name != d["file"] or d["file"] in ("", ".", ".."):
                raise bad(f"{where}.file", "a file name inside the store", d["file"])
            for key in ("num_tokens", "num_documents"):
                if not _count(d.get(key, 0)):
                    raise bad(f"{where}.{key}", "an integer >= 0", d.get(key))
            d["num_tokens"]  # noqa: B018 - presence check
            sha = d["sha256"]
            if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
                raise bad(f"{where}.sha256", "64 lowercase hex digits", sha)
