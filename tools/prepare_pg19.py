#!/usr/bin/env python3
"""PG-19 from a local download -> a token store for reformer-train (one book = one document).

PG-19 (Rae et al. 2019; https://github.com/google-deepmind/pg19) is 28,752 Project Gutenberg books
published before 1919: the `deepmind-gutenberg` bucket its README points to holds `train/`, `validation/`
and `test/`, one `<id>.txt` per book. Download those three folders first. The store's train split is
`train/`; its validation split is `validation/`, or `test/` with `--validation test` (for a final
number). Books are tokenised whole, bytes by default (vocabulary 257, what configs/bucket32.toml reads),
or with a SentencePiece tokenizer made by `reformer-data tokenizer`.

    python tools/prepare_pg19.py pg19/ --out data/pg19 --num-proc 8
    python tools/prepare_pg19.py pg19/ --out data/pg19_sp --tokenizer tok/   # tok/ from reformer-data tokenizer

Writing the store needs reformer_dist (`reformer-data shard`'s pipeline: datasets, streaming, the
verifying store writer): the installed package, or the source checkout this file lies in.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import reformer_dist  # noqa: F401
except ImportError:  # run from a source checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reformer_dist.cli.data import corpus_script_parser, print_summary
from reformer_dist.data.errors import DataError
from reformer_dist.data.pipeline import shard_corpus

FOLDERS = {"train": "train", "valid": "validation", "test": "test"}
BOOKS = "*.txt"


def books(root: Path, part: str) -> str:
    """The glob of one part's books; DataError naming the folder when it is missing or holds none."""
    folder = root / FOLDERS[part]
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (expected PG-19's train/, validation/ and test/ in {root})")
    if not any(folder.glob(BOOKS)):
        raise DataError(f"{folder}: no {BOOKS} books")
    return str(folder / BOOKS)


def prepare(
    root: Path,
    out: Path,
    tokenizer: str = "bytes",
    validation: str = "valid",
    shard_tokens: int = 1 << 27,
    num_proc: int = 1,
    overwrite: bool = False,
) -> Path:
    """Write the token store; returns its folder."""
    shard_corpus(
        [books(root, "train")],
        tokenizer,
        out,
        val_inputs=[books(root, validation)],
        shard_tokens=shard_tokens,
        num_proc=num_proc,
        text_unit="document",
        overwrite=overwrite,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = corpus_script_parser(__doc__, "the PG-19 folder (train/, validation/, test/)")
    p.add_argument("--tokenizer", default="bytes", help="'bytes' (default) or a `reformer-data tokenizer` folder")
    p.add_argument("--num-proc", type=int, default=1, help="tokenising processes (default 1)")
    args = p.parse_args(argv)
    try:
        out = prepare(
            args.source,
            Path(args.out),
            args.tokenizer,
            args.validation,
            args.shard_tokens,
            args.num_proc,
            args.overwrite,
        )
    except DataError as e:
        print(f"prepare_pg19: error: {e}", file=sys.stderr)
        return 1
    print_summary(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
