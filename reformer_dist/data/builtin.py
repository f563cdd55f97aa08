"""The built-in default corpus: Python's own standard library as bytes. No download, no preparation.

Documents are the public top-level ``*.py`` modules of the running interpreter's stdlib
(``sysconfig.get_paths()["stdlib"]``), sorted by name, up to ``MAX_BYTES`` (~4 MB): source code that
a small byte-level model learns quickly. Every 10th document (the pipeline's ``validation_mask`` with
fraction 0.1, ~0.3 MB) is the validation split. The content depends only on the Python version, which the
manifest records together with the corpus sha256.

``builtin_corpus()`` returns its token arrays; ``TokenStore.open("builtin")`` makes a store of them in
memory (~0.1 s; every call reads the files anew, nothing is written anywhere); ``reformer-data builtin
--out DIR`` writes them as an ordinary store.
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from pathlib import Path

import numpy as np

from reformer_dist.data.manifest import MANIFEST, SPLITS
from reformer_dist.data.pipeline import validation_mask
from reformer_dist.data.tokenizers import ByteTokenizer
from reformer_dist.data.writer import ShardWriter

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


def builtin_corpus() -> tuple[dict[str, np.ndarray], dict]:
    """The corpus as token arrays per split (uint16 byte ids, each document ended by the end-of-document
    id) and the metadata a store of it records (its sha256 and the Python version it comes from)."""
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
    metadata = {
        "builtin": True,
        "source": "Python standard library (top-level public *.py modules)",
        "python_version": platform.python_version(),
        "corpus_sha256": sha.hexdigest(),
        "val_fraction": VAL_FRACTION,
    }
    return arrays, metadata


def write_builtin(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the built-in corpus to ``out_dir`` as an ordinary store (one shard per split)."""
    arrays, metadata = builtin_corpus()
    with ShardWriter(
        out_dir, ByteTokenizer(), max(a.size for a in arrays.values()), overwrite=overwrite, metadata=metadata
    ) as writer:
        for split, a in arrays.items():
            writer.add(split, a)
    return Path(out_dir) / MANIFEST
