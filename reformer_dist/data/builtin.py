"""The built-in default corpus: Python's own standard library as bytes. No download, no preparation.

Documents are the public top-level ``*.py`` modules of the running interpreter's stdlib
(``sysconfig.get_paths()["stdlib"]``), sorted by name, up to ``MAX_BYTES`` (~4 MB): source code that
a small byte-level model learns quickly. Every 10th document (the pipeline's ``validation_mask`` with
fraction 0.1, ~0.3 MB) is the validation split. The content depends only on the Python version, which the
manifest records together with the corpus sha256.

``TokenStore.open("builtin")`` builds it in memory (~0.1 s; each process builds its own, nothing
is written anywhere); ``reformer-data builtin --out DIR`` writes it as an ordinary store.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import sysconfig
from pathlib import Path

import numpy as np

from reformer_dist.data.pipeline import validation_mask
from reformer_dist.data.shards import SPLITS, ShardWriter, make_manifest
from reformer_dist.data.store import TokenStore
from reformer_dist.data.tokenizers import ByteTokenizer

MAX_BYTES = 4 << 20
VAL_FRACTION = 0.1


def builtin_files() -> list[Path]:
    """The corpus files, in order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for p in sorted(stdlib.glob("*.py")):
        if p.name.startswith("_") or not p.is_file():
            continue
        size = p.stat().st_size
        if total + size > MAX_BYTES:
            continue
        files.append(p)
        total += size
    return files


def _split_tokens() -> tuple[dict[str, np.ndarray], dict[str, int], str]:
    """Token arrays per split (uint16, bytes + end-of-document), document counts, corpus sha256."""
    tok = ByteTokenizer()
    files = builtin_files()
    is_val = validation_mask(np.arange(len(files)), VAL_FRACTION)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    sha = hashlib.sha256()
    eod = np.array([tok.eod_id], dtype=np.uint16)
    for path, val in zip(files, is_val):
        data = path.read_bytes()
        sha.update(path.name.encode() + b"\0" + data)
        parts["validation" if val else "train"] += [np.frombuffer(data, dtype=np.uint8).astype(np.uint16), eod]
    arrays = {s: np.concatenate(p) if p else np.empty(0, np.uint16) for s, p in parts.items()}
    docs = {s: len(p) // 2 for s, p in parts.items()}
    return arrays, docs, sha.hexdigest()


def _metadata(corpus_sha256: str) -> dict:
    return {
        "builtin": True,
        "source": "Python standard library (top-level public *.py modules)",
        "python_version": platform.python_version(),
        "corpus_sha256": corpus_sha256,
        "val_fraction": VAL_FRACTION,
    }


@functools.lru_cache(maxsize=1)
def builtin_store() -> TokenStore:
    """The built-in corpus as an in-memory TokenStore (cached per process)."""
    arrays, docs, corpus_sha = _split_tokens()
    shards = {
        s: [{"file": f"<builtin>/{s}", "num_tokens": int(a.size), "num_documents": docs[s],
             "sha256": hashlib.sha256(a.tobytes()).hexdigest()}]
        for s, a in arrays.items()
    }
    manifest = make_manifest(ByteTokenizer(), shards, _metadata(corpus_sha))
    return TokenStore(manifest, {s: [a] for s, a in arrays.items()}, path=None)


def write_builtin(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the built-in corpus to ``out_dir`` as an ordinary store (one shard per split)."""
    arrays, _, corpus_sha = _split_tokens()
    with ShardWriter(out_dir, ByteTokenizer(), max(a.size for a in arrays.values()),
                     overwrite=overwrite, metadata=_metadata(corpus_sha)) as writer:
        for split, a in arrays.items():
            writer.add(split, a)
    return Path(out_dir) / "manifest.json"
