"""Checksum manifest of a checkpoint folder: written last (after every rank finished), verified on load.

A folder is COMPLETE when it holds `MANIFEST.json`; it is INTACT when every file listed there exists
with the listed size and SHA-256. The manifest is written to a temporary name and renamed, so a
crash leaves either no manifest (incomplete: skipped by `--resume auto`) or a whole one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST = "MANIFEST.json"
FORMAT = "reformer_dist.checkpoint-manifest/1"


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt or does not fit the run; the message names the file."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):  # hashlib drops the GIL on large updates
            h.update(block)
    return h.hexdigest()


def _files(ckpt_dir: Path) -> list[Path]:
    return sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp"))


def write_manifest(ckpt_dir: str | Path, extra: dict | None = None, workers: int = 4) -> Path:
    """Hash every file under `ckpt_dir` and write MANIFEST.json atomically (call on one rank, after a barrier)."""
    d = Path(ckpt_dir)
    files = _files(d)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = list(pool.map(_sha256, files))
    entries = {str(p.relative_to(d)): {"size": p.stat().st_size, "sha256": h} for p, h in zip(files, digests)}
    body = {"format": FORMAT, "created": time.time(), "files": entries, **(extra or {})}
    tmp = d / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / MANIFEST)
    return d / MANIFEST


def is_complete(ckpt_dir: str | Path) -> bool:
    return (Path(ckpt_dir) / MANIFEST).is_file()


def read_manifest(ckpt_dir: str | Path) -> dict:
    m = Path(ckpt_dir) / MANIFEST
    if not m.is_file():
        raise CheckpointError(f"{ckpt_dir}: incomplete checkpoint (no {MANIFEST}; the save did not finish)")
    try:
        body = json.loads(m.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{m}: corrupt manifest ({e})") from None
    if body.get("format") != FORMAT or not isinstance(body.get("files"), dict):
        raise CheckpointError(f"{m}: not a {FORMAT} manifest")
    return body


def verify_manifest(ckpt_dir: str | Path, hashes: bool = True, workers: int = 4) -> dict:
    """Raise CheckpointError naming the first missing, truncated or altered file; return the manifest."""
    d = Path(ckpt_dir)
    body = read_manifest(d)
    files = body["files"]
    for rel, meta in files.items():
        p = d / rel
        if not p.is_file():
            raise CheckpointError(f"{p}: missing from checkpoint {d} (listed in {MANIFEST})")
        if p.stat().st_size != meta["size"]:
            raise CheckpointError(f"{p}: truncated or altered ({p.stat().st_size} bytes, {MANIFEST} says {meta['size']})")
    if hashes:
        rels = list(files)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            digests = list(pool.map(lambda r: _sha256(d / r), rels))
        for rel, h in zip(rels, digests):
            if h != files[rel]["sha256"]:
                raise CheckpointError(f"{d / rel}: corrupt (SHA-256 differs from {MANIFEST})")
    return body
