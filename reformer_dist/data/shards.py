"""Token store on disk: flat shard files, the manifest that describes them, and their verification.

A store is a folder::

    manifest.json            written last: its presence means the store is complete
    train-00000.bin ...      raw little-endian uint16 (uint32 when vocab_size > 65536) token ids
    validation-00000.bin ...
    tokenizer.model          SentencePiece stores only: the model, so the store decodes by itself

Shards are flat: documents follow each other, each ended by the tokenizer's end-of-document id, and
a document may continue into the next shard. A write happens in a hidden staging folder beside the
store (``.<name>.staging-<pid>-<id>``): shards under temporary names, flushed, renamed; the manifest
last; then the staged store is verified (sizes, sha256, token range) and only then renamed into
place. An existing store (``overwrite``) is moved aside in that same step and deleted afterwards, so
a failed or interrupted write leaves the previous store exactly as it was; files in the folder that
are not part of a store (notes, a README) are carried over.

Manifest (``FORMAT``)::

    {"format", "dtype", "vocab_size", "eod_id",
     "tokenizer": {"identity", "file"},
     "splits": {"train": {"num_tokens", "num_documents",
                          "shards": [{"file", "num_tokens", "num_documents", "sha256"}, ...]},
                "validation": {...}},
     "metadata": {...}}       # how it was made: sources, options
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from reformer_dist.data.errors import DataError
from reformer_dist.data.tokenizers import MODEL_FILE, SP_PREFIX, Tokenizer

FORMAT = "reformer_dist.token_store/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "validation")
# shards, and what a killed write leaves: temporary files and the pipeline's datasets cache
_LEFTOVER_RE = re.compile(r"^(train|validation)-\d{5}\.bin$|^\..+\.tmp-\d+$|^\.datasets-cache-")
_BLOCK = 1 << 23  # bytes (or tokens) per read when hashing / range-checking


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds ids 0..vocab_size-1."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def check_token_range(tokens: np.ndarray, tokenizer: Tokenizer, where: str) -> None:
    """DataError naming ``where`` if an id is outside ``0..vocab_size-1``."""
    if tokens.size == 0:
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= tokenizer.vocab_size:
        raise DataError(
            f"{where}: token id {hi if hi >= tokenizer.vocab_size else lo} outside the vocabulary "
            f"0..{tokenizer.vocab_size - 1} of tokenizer {tokenizer.identity}"
        )


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name, so readers see all of it or nothing."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _OpenShard:
    def __init__(self, final: Path, eod_id: int):
        self.final = final
        self.tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        self.file: BinaryIO = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.num_tokens = 0
        self.num_documents = 0
        self.eod_id = eod_id

    def write(self, tokens: np.ndarray) -> None:
        data = tokens.tobytes()
        self.file.write(data)
        self.sha.update(data)
        self.num_tokens += tokens.size
        self.num_documents += int(np.count_nonzero(tokens == self.eod_id))

    def commit(self) -> dict[str, Any]:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.final)
        return {"file": self.final.name, "num_tokens": self.num_tokens,
                "num_documents": self.num_documents, "sha256": self.sha.hexdigest()}

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


class ShardWriter:
    """Append token ids per split; shards of ``shard_tokens`` tokens are cut as they fill.

    Use as a context manager: on normal exit the staged store is completed, verified and moved into
    ``out_dir`` (``close``); on an exception the staging folder is removed (``abort``) and ``out_dir``
    is as it was.
    """

    def __init__(
        self,
        out_dir: str | Path,
        tokenizer: Tokenizer,
        shard_tokens: int,
        *,
        overwrite: bool = False,
        metadata: dict[str, Any] | None = None,
    ):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1 (got {shard_tokens})")
        self.out_dir = Path(out_dir)
        self.tokenizer = tokenizer
        self.shard_tokens = int(shard_tokens)
        self.dtype = dtype_for_vocab(tokenizer.vocab_size)
        self.metadata = dict(metadata or {})
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise DataError(f"{self.out_dir}: is a file; the store needs a folder")
        if (self.out_dir / MANIFEST).exists() and not overwrite:
            raise DataError(f"{self.out_dir}: already holds a token store ({MANIFEST}); pass overwrite/--overwrite")
        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_staging(self.out_dir)
            self.staging = self.out_dir.parent / f".{self.out_dir.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self.staging.mkdir(mode=0o777)  # the umask applies, as for any folder the user makes
        except OSError as e:
            raise DataError(f"{self.out_dir}: cannot write beside it ({e.strerror or e})") from None
        self._open: dict[str, _OpenShard] = {}
        self._done: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        self._closed = False

    def add(self, split: str, tokens: np.ndarray, source: str | None = None) -> None:
        """Append ``tokens`` (ids, end-of-document ids included) to ``split``."""
        if split not in self._done:
            raise ValueError(f"split must be one of {SPLITS} (got {split!r})")
        tokens = np.asarray(tokens).ravel()
        where = source or str(self.out_dir / shard_name(split, len(self._done[split])))
        check_token_range(tokens, self.tokenizer, where)
        tokens = tokens.astype(self.dtype, copy=False)
        while tokens.size:
            shard = self._open.get(split)
            if shard is None:
                final = self.staging / shard_name(split, len(self._done[split]))
                shard = self._open[split] = _OpenShard(final, self.tokenizer.eod_id)
            take = min(self.shard_tokens - shard.num_tokens, tokens.size)
            shard.write(tokens[:take])
            tokens = tokens[take:]
            if shard.num_tokens == self.shard_tokens:
                self._done[split].append(self._open.pop(split).commit())

    def num_tokens(self, split: str) -> int:
        """Tokens added to ``split`` so far."""
        open_shard = self._open.get(split)
        return sum(d["num_tokens"] for d in self._done[split]) + (open_shard.num_tokens if open_shard else 0)

    def close(self) -> Path:
        """Commit open shards, copy the tokenizer model, write the manifest, verify, move into place."""
        try:
            for split in list(self._open):
                self._done[split].append(self._open.pop(split).commit())
            tok_file = None
            if self.tokenizer.model_file is not None:
                tok_file = MODEL_FILE
                atomic_write_bytes(self.staging / MODEL_FILE, Path(self.tokenizer.model_file).read_bytes())
            manifest = make_manifest(self.tokenizer, self._done, self.metadata, tokenizer_file=tok_file)
            atomic_write_bytes(self.staging / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
            _fsync_dir(self.staging)
            try:
                verify_store(self.staging)  # what reached the disk, re-read: only a verified store replaces one
            except DataError as e:
                raise DataError(f"{self.out_dir}: the new store failed verification, the old one is kept: {e}") from None
            self._replace_out()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.out_dir / MANIFEST

    def _replace_out(self) -> None:
        """Swap the verified staging folder in; an existing folder's non-store files are carried over."""
        out, old = self.out_dir, None
        if out.is_dir():
            os.chmod(self.staging, out.stat().st_mode & 0o7777)  # keep the folder's mode (e.g. group setgid)
            if any(out.iterdir()):
                old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                try:
                    os.rename(out, old)
                except OSError as e:
                    raise DataError(f"{out}: cannot move the old folder aside ({e.strerror or e}); a mount point? "
                                    "write the store to a new folder inside it") from None
            else:
                out.rmdir()
        os.rename(self.staging, out)
        if old is not None:
            for p in old.iterdir():
                if p.name in (MANIFEST, MODEL_FILE) or _LEFTOVER_RE.match(p.name) or (out / p.name).exists():
                    continue
                os.rename(p, out / p.name)  # the user's own files (notes, a README) stay with the store
            shutil.rmtree(old)
        _fsync_dir(out.parent)

    def abort(self) -> None:
        """Remove every file this write made; ``out_dir`` stays as it was."""
        for shard in self._open.values():
            shard.discard()
        self._open.clear()
        shutil.rmtree(self.staging, ignore_errors=True)
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._closed:
            return
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _remove_stale_staging(out_dir: Path) -> None:
    """Staging folders of writes into ``out_dir`` whose process is gone (killed mid-write)."""
    for p in out_dir.parent.glob(f".{out_dir.name}.staging-*"):
        try:
            pid = int(p.name.rsplit(".staging-", 1)[1].split("-")[0])
            os.kill(pid, 0)
        except (ValueError, IndexError, ProcessLookupError):
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass  # another user's live process


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
            s: {"num_tokens": sum(d["num_tokens"] for d in shards[s]),
                "num_documents": sum(d["num_documents"] for d in shards[s]),
                "shards": shards[s]}
            for s in SPLITS
        },
        "metadata": metadata,
    }


def read_manifest(store_dir: str | Path) -> dict[str, Any]:
    """Load and sanity-check ``store_dir/manifest.json``."""
    path = Path(store_dir) / MANIFEST
    if not path.is_file():
        why = (f"no {MANIFEST}: not a token store, or its write did not finish"
               if Path(store_dir).is_dir() else "no such folder")
        raise DataError(f"{path}: {why}")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable manifest: {e}") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise DataError(f"{path}: format {got!r}, expected {FORMAT!r}")
    try:
        if np.dtype(m["dtype"]) != dtype_for_vocab(int(m["vocab_size"])):
            raise DataError(f"{path}: dtype {m['dtype']} does not match vocab_size {m['vocab_size']}")
        for s in SPLITS:
            for d in m["splits"][s]["shards"]:
                d["file"], d["num_tokens"], d["sha256"]  # noqa: B018 - presence check
        m["tokenizer"]["identity"]  # noqa: B018
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: malformed manifest (missing {e})") from e
    return m


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


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


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
            if _file_sha256(path) != d["sha256"]:
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
        elif SP_PREFIX + _file_sha256(path) != m["tokenizer"]["identity"]:
            problems.append(f"{path}: sha256 does not match tokenizer identity {m['tokenizer']['identity']}")
    if problems:
        raise DataError(f"{store_dir}: verification failed:\n  " + "\n  ".join(problems))
    return m

