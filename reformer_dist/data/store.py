"""``TokenStore``: read-only view of a token store's splits, each a sequence of shards.

Built from a folder (``from_folder``: shards memory-mapped on first use) or from arrays in memory
(``from_arrays``: the built-in corpus); ``open`` takes a ``data.path`` spec ("builtin" or a folder).
Nothing is read whole: ``read`` copies just the requested range (numpy slicing of the maps, i.e. a
memcpy), crossing shard boundaries as needed.

    store = TokenStore.open("data/my_store", expect_tokenizer="bytes")
    store.num_tokens("train"); store.read("train", start=0, length=4097)
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from reformer_dist.data.builtin import builtin_corpus
from reformer_dist.data.errors import DataError
from reformer_dist.data.manifest import MANIFEST, SPLITS, make_manifest, read_manifest
from reformer_dist.data.tokenizers import (
    BYTES,
    SYMBOLS_PREFIX,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    tokenizer_identity,
)
from reformer_dist.data.verify import check_sizes, verify_store

BUILTIN = "builtin"


class TokenStore:
    """Token ids of a store's ``train`` and ``validation`` splits. Build with ``open``, ``from_folder`` or
    ``from_arrays``.

    name: how messages name the store (its folder, or "builtin"); where: what a mismatch names (its manifest).
    shards: per split, each shard's name for messages and its data (a file to map on first use, or an array).
    """

    def __init__(
        self,
        manifest: dict[str, Any],
        shards: dict[str, list[tuple[str, Path | np.ndarray]]],
        *,
        name: str,
        where: str,
        tokenizer: Callable[[], Tokenizer],
    ):
        self.manifest = manifest
        self.name = name
        self.where = where
        self.vocab_size = int(manifest["vocab_size"])
        self.eod_id = int(manifest["eod_id"])
        self.dtype = np.dtype(manifest["dtype"])
        self.identity: str = manifest["tokenizer"]["identity"]
        self._shard_names = {s: [n for n, _ in shards[s]] for s in SPLITS}
        self._shards = {s: [data for _, data in shards[s]] for s in SPLITS}  # Path (mapped lazily) or array
        self._starts = {}  # per split: first token index of each shard, then the total
        for s in SPLITS:
            counts = [d["num_tokens"] for d in manifest["splits"][s]["shards"]]
            self._starts[s] = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).tolist()
        self._load_tokenizer = tokenizer
        self._tokenizer: Tokenizer | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def open(cls, spec: str | Path, expect_tokenizer: str | None = None, verify: bool = False) -> TokenStore:
        """``"builtin"`` (the embedded default corpus, made in memory) or a store folder (``from_folder``).

        expect_tokenizer: identity (or tokenizer spec) the run was configured with; a store written by
            another tokenizer raises DataError.
        verify: also check every shard's sha256 and token range (reads everything once; sizes are
            always checked). The built-in corpus is made in memory and needs no check.
        """
        if str(spec) == BUILTIN:
            arrays, metadata = builtin_corpus()
            store = cls.from_arrays(arrays, load_tokenizer(BYTES), metadata, name=BUILTIN)
        else:
            store = cls.from_folder(spec, verify=verify)
        if expect_tokenizer is not None:
            want = tokenizer_identity(expect_tokenizer)
            if want != store.identity:
                raise DataError(
                    f"{store.where}: store was tokenised with {store.identity!r}, but the run expects {want!r}"
                )
        return store

    @classmethod
    def from_folder(cls, path: str | Path, verify: bool = False) -> TokenStore:
        """The store written in a folder (by ``ShardWriter``); ``verify`` as in ``open``."""
        root = Path(path)
        manifest = verify_store(root) if verify else read_manifest(root)
        if not verify:
            check_sizes(root, manifest)
        shards = {
            s: [(str(root / d["file"]), root / d["file"]) for d in manifest["splits"][s]["shards"]] for s in SPLITS
        }
        return cls(
            manifest,
            shards,
            name=str(root),
            where=str(root / MANIFEST),
            tokenizer=lambda: _folder_tokenizer(root, manifest),
        )

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, np.ndarray], tokenizer: Tokenizer, metadata: dict[str, Any], name: str
    ) -> TokenStore:
        """A store in memory: one shard per split, the token ids of ``arrays`` (end-of-document ids included)."""
        entries = {
            s: [
                {
                    "file": f"<{name}>/{s}",
                    "num_tokens": int(a.size),
                    "num_documents": int(np.count_nonzero(a == tokenizer.eod_id)),
                    "sha256": hashlib.sha256(a.tobytes()).hexdigest(),
                }
            ]
            for s, a in arrays.items()
        }
        manifest = make_manifest(tokenizer, entries, metadata)
        shards: dict[str, list[tuple[str, Path | np.ndarray]]] = {
            s: [(str(entries[s][0]["file"]), np.asarray(a, dtype=manifest["dtype"]))] for s, a in arrays.items()
        }
        return cls(manifest, shards, name=name, where=name, tokenizer=lambda: tokenizer)

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
            self._tokenizer = self._load_tokenizer()
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
        """The file (or in-memory shard name) holding token ``index`` of ``split``."""
        starts = self._starts[self._split(split)]
        i = max(0, min(bisect.bisect_right(starts, index) - 1, len(starts) - 2))
        return self._shard_names[split][i]

    def _shard(self, split: str, i: int) -> np.ndarray:
        shard = self._shards[split][i]
        if isinstance(shard, Path):  # map on first use: a big store may have many shards
            shard = self._shards[split][i] = np.memmap(shard, dtype=self.dtype, mode="r")
        return shard

    def _split(self, split: str) -> str:
        if split not in self._starts:
            raise ValueError(f"split must be one of {SPLITS} (got {split!r})")
        return split


def _folder_tokenizer(root: Path, manifest: dict[str, Any]) -> Tokenizer:
    """The tokenizer a store folder names: bytes, or the SentencePiece model it carries (checked)."""
    identity = manifest["tokenizer"]["identity"]
    if identity == BYTES or identity.startswith(SYMBOLS_PREFIX):
        return load_tokenizer(identity)
    file = manifest["tokenizer"].get("file")
    if not file:
        raise DataError(f"{root}: store does not carry its tokenizer ({identity})")
    tok = SentencePieceTokenizer(root / file)
    if tok.identity != identity:
        raise DataError(f"{root / file}: tokenizer model does not match identity {identity}")
    return tok
