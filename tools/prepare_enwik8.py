#!/usr/bin/env python3
"""enwik8 from a local download -> a byte-level token store for reformer-train (the paper's split).

enwik8 is the first 100,000,000 bytes of an English Wikipedia XML dump (http://mattmahoney.net/dc/enwik8.zip).
The usual split is the first 90M bytes for training, the next 5M for validation and the last 5M for
test; a file of another size is split at the same fractions (90% / 5% / 5%). The store holds two
splits, train and validation: `--validation test` puts the test bytes there instead of the validation
bytes (for a final number). The bytes are kept exactly as they are (no UTF-8 decoding: a split point may
fall inside a character); every split is one document, ended by the end-of-document id 256.

    python tools/prepare_enwik8.py enwik8.zip --out data/enwik8
    reformer-train --config configs/enwik8_64k.toml

Writing the store needs reformer_dist (its token-store writer, which verifies what it wrote): the
installed package, or the source checkout this file lies in.
"""

from __future__ import annotations

import hashlib
import sys
import zipfile
from pathlib import Path

try:
    import reformer_dist  # noqa: F401
except ImportError:  # run from a source checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from reformer_dist.cli.data import corpus_script_parser, print_summary
from reformer_dist.data.errors import DataError
from reformer_dist.data.manifest import read_manifest
from reformer_dist.data.tokenizers import ByteTokenizer
from reformer_dist.data.writer import ShardWriter

ENWIK8_BYTES = 100_000_000
TRAIN_END, VALID_END = 90, 95  # percent of the file: train | validation | test
MEMBER = "enwik8"  # the file inside enwik8.zip


def read_corpus(path: Path) -> bytes:
    """The raw bytes of `path`: the file itself, or the `enwik8` member of a zip archive."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            name = MEMBER if MEMBER in names else names[0] if len(names) == 1 else None
            if name is None:
                raise DataError(f"{path}: a zip archive without an {MEMBER!r} member (holds {names[:5]})")
            return z.read(name)
    return path.read_bytes()


def split_points(n: int) -> tuple[int, int]:
    """Where validation and test start in a corpus of `n` bytes (90M and 95M for enwik8)."""
    return n * TRAIN_END // 100, n * VALID_END // 100


def prepare(
    source: Path, out: Path, validation: str = "valid", shard_tokens: int = 1 << 27, overwrite: bool = False
) -> Path:
    """Write the token store; returns its folder."""
    data = read_corpus(source)
    if not data:
        raise DataError(f"{source}: empty file")
    a, b = split_points(len(data))
    held_out = (a, b) if validation == "valid" else (b, len(data))
    raw = np.frombuffer(data, dtype=np.uint8)
    tok = ByteTokenizer()
    eod = np.array([tok.eod_id], dtype=np.uint16)
    metadata = {
        "source": str(source),
        "corpus": "enwik8",
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "train_bytes": [0, a],
        "validation_bytes": list(held_out),
        "validation_is": validation,
    }
    with ShardWriter(out, tok, shard_tokens, overwrite=overwrite, metadata=metadata) as writer:
        for split, (lo, hi) in (("train", (0, a)), ("validation", held_out)):
            step = 1 << 24  # 16M bytes at a time: memory stays ~3x that, not 3x the corpus
            for start in range(lo, hi, step):
                writer.add(split, raw[start : min(start + step, hi)].astype(np.uint16))
            writer.add(split, eod)
    return out


def main(argv: list[str] | None = None) -> int:
    args = corpus_script_parser(__doc__, "the downloaded enwik8 file, or enwik8.zip").parse_args(argv)
    try:
        if not args.source.is_file():
            raise DataError(f"{args.source}: no such file")
        out = prepare(args.source, Path(args.out), args.validation, args.shard_tokens, args.overwrite)
    except (DataError, OSError, zipfile.BadZipFile) as e:
        print(f"prepare_enwik8: error: {e}", file=sys.stderr)
        return 1
    if read_manifest(out)["metadata"]["bytes"] != ENWIK8_BYTES:
        print(
            f"prepare_enwik8: note: {args.source} is not the {ENWIK8_BYTES:,}-byte enwik8; split at the same fractions",
            file=sys.stderr,
        )
    print_summary(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
