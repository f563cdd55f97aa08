"""SHA-256 checksums of a weights folder (`reformer-ckpt consolidate` / `import-hf` / `export-hf` output).

`checksums.json` sits next to the files it describes (weights, shard index, config.json):

    {"format": "reformer_dist.weights-checksums/1",
     "files": {"model.safetensors": {"size": 123, "sha256": "..."}, "config.json": {...}}}

`io.load_weights` (and so `ReformerLM.from_pretrained`) verifies it whenever it is present, so a
truncated, flipped or swapped file raises `CorruptCheckpointError` naming the file instead of loading a
silently wrong model. safetensors itself only notices truncation and broken headers, not flipped data.
Folders written by hand (`save_pretrained`) have no checksum file and load unverified.

Also here: `verify_torch_file`, a CRC check of DeepSpeed's `.pt` files (zip archives with a CRC-32 per
record) before they are unpickled, so a damaged ZeRO shard is reported by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

from reformer_dist.checkpoint.integrity import CheckpointError

CHECKSUMS = "checksums.json"
FORMAT = "reformer_dist.weights-checksums/1"


class CorruptCheckpointError(CheckpointError, ValueError):
    """A file is missing, truncated or altered; the message names it. (A ValueError too, for callers that
    already catch the ValueError that `load_weights` raised before checksums existed.)"""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(directory: str | Path, names: list[str]) -> Path:
    """Hash `names` (paths relative to `directory`) into directory/checksums.json (temp file + rename)."""
    d = Path(directory)
    files = {n: {"size": (d / n).stat().st_size, "sha256": sha256_file(d / n)} for n in sorted(names)}
    tmp = d / (CHECKSUMS + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "files": files}, indent=1) + "\n")
    os.replace(tmp, d / CHECKSUMS)
    return d / CHECKSUMS


def read_checksums(directory: str | Path) -> dict | None:
    """The parsed checksums.json of `directory`, or None when there is none."""
    p = Path(directory) / CHECKSUMS
    if not p.is_file():
        return None
    try:
        body = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{p}: corrupt checksum file ({e})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT or not isinstance(body.get("files"), dict):
        raise CorruptCheckpointError(f"{p}: not a {FORMAT} file")
    return body


def verify_checksums(directory: str | Path, required: bool = False) -> bool:
    """Check every file listed in directory/checksums.json (size first, then SHA-256).

    Returns True when verified, False when there is no checksum file (and `required` is False).
    Raises CorruptCheckpointError naming the first missing, truncated or altered file.
    """
    d = Path(directory)
    body = read_checksums(d)
    if body is None:
        if required:
            raise CorruptCheckpointError(f"{d}: no {CHECKSUMS}; cannot verify the weights")
        return False
    for name, meta in body["files"].items():
        p = d / name
        if not p.is_file():
            raise CorruptCheckpointError(f"{p}: missing (listed in {d / CHECKSUMS})")
        size = p.stat().st_size
        if size != meta["size"]:
            raise CorruptCheckpointError(f"{p}: truncated or altered ({size} bytes, {CHECKSUMS} says {meta['size']})")
        if sha256_file(p) != meta["sha256"]:
            raise CorruptCheckpointError(
                f"{p}: corrupt (SHA-256 differs from {d / CHECKSUMS}); if you edited it on purpose, "
                f"delete {CHECKSUMS} to load it unverified")
    return True


def verify_torch_file(path: str | Path) -> None:
    """Raise CorruptCheckpointError if a `torch.save` file (zip format) is truncated or fails its CRC-32.

    Reads the whole file once (CRC in C, ~1 GB/s); legacy non-zip pickles are not checked.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CorruptCheckpointError(f"{p}: cannot be read ({e})") from None
    if magic != b"PK\x03\x04":
        if len(magic) < 4 or magic[:1] != b"\x80":  # not a zip and not a legacy pickle either
            raise CorruptCheckpointError(f"{p}: not a torch checkpoint file (truncated or corrupt?)")
        return
    try:
        with zipfile.ZipFile(p) as z:
            for info in z.infolist():
                # torch.save writes a CRC-32 per record unless torch.serialization.set_crc32_options(False)
                # was used (then CRC is 0): such records are read through (size checked) but not CRC-checked.
                with z.open(info) as f:
                    if info.CRC == 0 and info.file_size:
                        f._expected_crc = None  # zipfile's own switch for "no CRC to compare"
                    while f.read(1 << 22):
                        pass
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as e:
        raise CorruptCheckpointError(f"{p}: truncated or corrupt ({type(e).__name__}: {e})") from None
