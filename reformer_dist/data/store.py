"""``TokenStore``: read-only view of a token store's splits, each a sequence of memory-mapped shards.

Nothing is read whole: shards are mapped on first use and ``read`` copies just the requested range
(numpy slicing of the maps, i.e. a memcpy), crossing shard boundaries as needed.

    store = TokenStore.open("data/my_store", expect_tokenizer="bytes")
    store.num_tokens("train"); store.read("train", start=0, length=4097)
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any

import numpy as np

from reformer_dist.data.errors import DataError
from reformer_dist.data.shards import MANIFEST, SPLITS, check_sizes, read_manifest, verify_store
from reformer_dist.data.tokenizers import (
    BYTES,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    tokenizer_identity,
)

BUILTIN = "builtin"


class TokenStore:
    """Token ids of a store's ``train`` and ``validation`` splits. Build with ``open``."""

    def __init__(self, manifest: dict[str, Any], shards: dict[str, list[Path | np.ndarray]], path: Path | None):
        self.manifest = manifest
        self.path = path  # None for the in-memory built-in store
        self.name = str(path) if path is not None else BUILTIN
        self.vocab_size = int(manifest["vocab_size"])
        self.eod_id = int(manifest["eod_id"])
        self.dtype = np.dtype(manifest["dtype"])
        self.identity: str = manifest["tokenizer"]["identity"]
        self._shards = shards  # per split: Path (mapped lazily) or array
        self._starts = {}  # per split: first token index of each shard, then the total
        for s in SPLITS:
            counts = [d["num_tokens"] for d in manifest["splits"][s]["shards"]]
            self._starts[s] = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).tolist()
        self._tokenizer: Tokenizer | None = None

    @classmethod
    def open(cls, path: str | Path, expect_tokenizer: str | None = None, verify: bool = False) -> TokenStore:
        """Open a store folder (or ``"builtin"``, the embedded default corpus).

        expect_tokenizer: identity (or tokenizer spec) the run was configured with; a store written by
            another tokenizer raises DataError.
        verify: also check every shard's sha256 and token range (reads everything once; sizes are
            always checked).
        """
        if str(path) == BUILTIN:
            from reformer_dist.data.builtin import builtin_store

            store = builtin_store()
        else:
            root = Path(path)
            manifest = verify_store(root) if verify else read_manifest(root)
            if not verify:
                check_sizes(root, manifest)
            shards = {s: [root / d["file"] for d in manifest["splits"][s]["shards"]] for s in SPLITS}
            store = cls(manifest, shards, root)
        if expect_tokenizer is not None:
            want = tokenizer_identity(expect_tokenizer)
            if want != store.identity:
                where = store.path / MANIFEST if store.path is not None else BUILTIN
                raise DataError(
                    f"{where}: store was tokenised with {store.identity!r}, but the run expects {want!r}"
                )
        return store

    # ------------------------------------------------------------------ description
    def num_tokens(self, split: str) -> int:
        return int(self._starts[self._split(split)][-1])

    def num_documents(self, split: str) -> int:
        return int(self.manifest["splits"][self._split(split)]["num_documents"])

    def num_shards(self, split: str) -> int:
        return len(self._shards[self._split(split)])

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer that wrote the store (loaded on first use, checked against the identity)."""
        if self._tokenizer is None:
            if self.identity == BYTES:
                tok = load_tokenizer(BYTES)
            else:
                file = self.manifest["tokenizer"].get("file")
                if not file or self.path is None:
                    raise DataError(f"{self.name}: store does not carry its tokenizer ({self.identity})")
                tok = SentencePieceTokenizer(self.path / file)
                if tok.identity != self.identity:
                    raise DataError(f"{self.path / file}: tokenizer model does not match identity {self.identity}")
            self._tokenizer = tok
        return self._tokenizer

    def __repr__(self) -> str:
        n = ", ".join(f"{s}={self.num_tokens(s)}" for s in SPLITS)
        return f"TokenStore({self.name!r}, {self.identity}, vocab_size={self.vocab_size}, tokens: {n})"

    # ------------------------------------------------------------------ reading
    def read(self, split: str, start: int, length: int, out: np.ndarray | None = None) -> np.ndarray:
        """Tokens ``[start, start + length)`` of ``split`` (in the store's dtype, or into ``out``)."""
        starts = self._starts[self._split(split)]
        if start < 0 or length < 0 or start + length > starts[-1]:
            raise IndexError(f"{self.name}: tokens [{start}, {start + length}) outside {split} (0..{starts[-1]})")
        if out is None:
            out = np.empty(length, dtype=self.dtype)
        elif out.shape != (length,):
            raise ValueError(f"out has shape {out.shape}, expected ({length},)")
        i = bisect.bisect_right(starts, start) - 1
        pos = 0
        while pos < length:
            arr = self._shard(split, i)
            lo = start + pos - starts[i]
            take = min(length - pos, arr.shape[0] - lo)
            out[pos : pos + take] = arr[lo : lo + take]
            pos += take
            i += 1
        return out

    def shard_name(self, split: str, index: int) -> str:
        """The file (or built-in name) holding token ``index`` of ``split``."""
        starts = self._starts[self._split(split)]
        i = max(0, min(bisect.bisect_right(starts, index) - 1, len(starts) - 2))
        entry = self.manifest["splits"][split]["shards"][i]["file"]
        return str(self.path / entry) if self.path is not None else entry

    def _shard(self, split: str, i: int) -> np.ndarray:
        shard = self._shards[split][i]
        if isinstance(shard, Path):  # map on first use: a big store may have many shards
            shard = self._shards[split][i] = np.memmap(shard, dtype=self.dtype, mode="r")
        return shard

    def _split(self, split: str) -> str:
        if split not in self._starts:
            raise ValueError(f"split must be one of {SPLITS} (got {split!r})")
        return split
