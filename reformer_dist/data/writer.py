"""Writing a token store: ``ShardWriter`` appends token ids per split and cuts shards as they fill.

The format is data/manifest.py's. A write happens in a hidden staging folder beside the store
(``.<name>.staging-<pid>-<id>``): shards under temporary names, flushed, renamed; the manifest last;
then the staged store is verified (data/verify.py: sizes, sha256, token range) and only then renamed
into place. An existing store (``overwrite``) is moved aside in that same step and deleted afterwards,
so a failed or interrupted write leaves the previous store exactly as it was; files in the folder that
are not part of a store (notes, a README) are carried over. One write per store folder at a time: a lock
file ``.<name>.lock`` beside it (run_lock.py's lock, taken over when its process is gone).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from reformer_dist.data.errors import DataError, UsageError
from reformer_dist.data.manifest import MANIFEST, SPLITS, dtype_for_vocab, make_manifest
from reformer_dist.data.tokenizers import Tokenizer
from reformer_dist.data.verify import verify_store
from reformer_dist.ondisk import (
    DATASETS_CACHE_PREFIX,
    TOKENIZER_MODEL,
    AtomicFile,
    atomic_write,
    fsync_dir,
    is_atomic_temp,
    is_store_shard,
    store_shard_name,
)
from reformer_dist.run_lock import RunLock, RunLockedError


def _store_file(name: str) -> bool:
    """A store's own file, or what a killed write leaves (temporary files, the pipeline's datasets cache)."""
    return (
        name in (MANIFEST, TOKENIZER_MODEL)
        or is_store_shard(name, SPLITS)
        or is_atomic_temp(name)
        or name.startswith(DATASETS_CACHE_PREFIX)
    )


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


class _OpenShard:
    """One shard being written: streamed into an AtomicFile, hashed and counted as it goes."""

    def __init__(self, final: Path, eod_id: int):
        self.out = AtomicFile(final)
        self.sha = hashlib.sha256()
        self.num_tokens = 0
        self.num_documents = 0
        self.eod_id = eod_id

    def write(self, tokens: np.ndarray) -> None:
        data = tokens.tobytes()
        self.out.file.write(data)
        self.sha.update(data)
        self.num_tokens += tokens.size
        self.num_documents += int(np.count_nonzero(tokens == self.eod_id))

    def commit(self) -> dict[str, Any]:
        self.out.commit()
        return {
            "file": self.out.path.name,
            "num_tokens": self.num_tokens,
            "num_documents": self.num_documents,
            "sha256": self.sha.hexdigest(),
        }

    def discard(self) -> None:
        self.out.discard()


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
        # One writer per store folder: two writes into one new --out would both succeed, the last one winning.
        self._lock = RunLock(
            self.out_dir, "--out", path=self.out_dir.parent / f".{self.out_dir.name}.lock", user="reformer-data write"
        )
        try:
            self._lock.acquire()
        except RunLockedError as e:
            raise UsageError(str(e)) from None
        except OSError as e:
            raise DataError(f"{self.out_dir}: cannot write beside it ({e.strerror or e})") from None
        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_staging(self.out_dir)
            self.staging = self.out_dir.parent / f".{self.out_dir.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self.staging.mkdir(mode=0o777)  # the umask applies, as for any folder the user makes
        except OSError as e:
            self._lock.release()
            raise DataError(f"{self.out_dir}: cannot write beside it ({e.strerror or e})") from None
        self._open: dict[str, _OpenShard] = {}
        self._done: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        self._closed = False

    def add(self, split: str, tokens: np.ndarray, source: str | None = None) -> None:
        """Append ``tokens`` (ids, end-of-document ids included) to ``split``."""
        if split not in self._done:
            raise ValueError(f"split must be one of {SPLITS} (got {split!r})")
        tokens = np.asarray(tokens).ravel()
        where = source or str(self.out_dir / store_shard_name(split, len(self._done[split])))
        check_token_range(tokens, self.tokenizer, where)
        tokens = tokens.astype(self.dtype, copy=False)
        while tokens.size:
            shard = self._open.get(split)
            if shard is None:
                final = self.staging / store_shard_name(split, len(self._done[split]))
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
                tok_file = TOKENIZER_MODEL
                atomic_write(self.staging / TOKENIZER_MODEL, Path(self.tokenizer.model_file).read_bytes())
            manifest = make_manifest(self.tokenizer, self._done, self.metadata, tokenizer_file=tok_file)
            atomic_write(self.staging / MANIFEST, json.dumps(manifest, indent=2) + "\n")
            try:
                verify_store(self.staging)  # what reached the disk, re-read: only a verified store replaces one
            except DataError as e:
                raise DataError(
                    f"{self.out_dir}: the new store failed verification, the old one is kept: {e}"
                ) from None
            self._replace_out()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._lock.release()
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
                    raise DataError(
                        f"{out}: cannot move the old folder aside ({e.strerror or e}); a mount point? "
                        "write the store to a new folder inside it"
                    ) from None
            else:
                out.rmdir()
        os.rename(self.staging, out)
        if old is not None:
            for p in old.iterdir():
                if _store_file(p.name) or (out / p.name).exists():
                    continue
                os.rename(p, out / p.name)  # the user's own files (notes, a README) stay with the store
            shutil.rmtree(old)
        fsync_dir(out.parent)

    def abort(self) -> None:
        """Remove every file this write made; ``out_dir`` stays as it was."""
        for shard in self._open.values():
            shard.discard()
        self._open.clear()
        shutil.rmtree(self.staging, ignore_errors=True)
        self._closed = True
        self._lock.release()

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
