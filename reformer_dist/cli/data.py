"""``reformer-data``: prepare training data (see docs/data.md).

    reformer-data tokenizer --input corpus/ --vocab-size 32000 --model-type bpe --out tok/
    reformer-data shard --input corpus/ --tokenizer tok/ --out store/ --shard-tokens 100000000 \\
                        --num-proc 8 --val-fraction 0.01        # or --val-input held_out/
    reformer-data verify store/
    reformer-data inspect store/            # or: inspect builtin
    reformer-data builtin --out store/      # the embedded default corpus, written as a store
    reformer-data synth --task duplication --lengths 1024 --train-examples 20000 --out dup/   # docs/long_context.md
    reformer-data synth --task passkey --lengths 1024,4096 --depths 0,0.5,1 --out passkey/

Exit status: 0 on success, 1 on a data error (message on stderr, naming the file), 2 on a usage error
(a bad option value, an output folder inside the input). See docs/troubleshooting.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# the data modules import neither torch nor datasets (the pipeline loads datasets when it shards)
from reformer_dist import console
from reformer_dist.cli.args import int_at_least, worker_count
from reformer_dist.data.builtin import write_builtin
from reformer_dist.data.errors import DataError, UsageError
from reformer_dist.data.manifest import SPLITS, read_manifest
from reformer_dist.data.pipeline import shard_corpus, train_tokenizer
from reformer_dist.data.store import TokenStore
from reformer_dist.data.synthetic import TASKS, SynthSpec, write_synthetic
from reformer_dist.data.verify import verify_store
from reformer_dist.exit_codes import ExitCode

log = logging.getLogger("reformer_dist.cli.data")  # not __name__: "__main__" under `python -m`


def _coverage(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return v


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return v


def _add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input",
        "-i",
        nargs="+",
        required=True,
        help="files, folders (recursive) or glob patterns: text, .jsonl/.json[.gz], .parquet",
    )
    p.add_argument("--text-field", default="text", help="field holding the text in JSON / Parquet records")
    p.add_argument(
        "--text-unit",
        default="document",
        choices=("document", "paragraph", "line"),
        help="what one document is in a plain-text file (default: the whole file)",
    )


def add_store_output_args(p: argparse.ArgumentParser) -> None:
    """--out, --shard-tokens and --overwrite, the same for every command that writes a token store
    (`reformer-data shard` and the corpus scripts in tools/)."""
    p.add_argument("--out", required=True, help="store folder (manifest.json + shards)")
    p.add_argument("--shard-tokens", type=int_at_least(1), default=1 << 27, help="tokens per shard file (default 2^27)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a store already in --out (only once the new one is complete and verified)",
    )


def corpus_script_parser(doc: str, source_help: str) -> argparse.ArgumentParser:
    """The command line every corpus script in tools/ shares: its docstring as the help, SOURCE (the local
    download), --validation valid|test (which held-out part the store's validation split holds) and
    `add_store_output_args`."""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", type=Path, help=source_help)
    p.add_argument(
        "--validation",
        choices=("valid", "test"),
        default="valid",
        help="the corpus's held-out part that becomes the store's validation split (default: valid)",
    )
    add_store_output_args(p)
    return p


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="reformer-data", description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tokenizer", help="train a SentencePiece tokenizer (byte fallback)")
    _add_input_args(p)
    p.add_argument(
        "--vocab-size",
        type=int_at_least(1),
        required=True,
        help="pieces to learn (at least 259 + the corpus's frequent characters; may come out smaller)",
    )
    p.add_argument("--model-type", default="bpe", choices=("bpe", "unigram"))
    p.add_argument("--out", required=True, help="folder for tokenizer.model / .vocab / .json")
    p.add_argument(
        "--character-coverage",
        type=_coverage,
        default=0.9995,
        help="share of characters given their own piece; rarer ones fall back to bytes",
    )
    p.add_argument(
        "--max-sentences",
        type=int_at_least(1),
        default=1_000_000,
        help="lines sampled from the corpus for training (bounds memory)",
    )
    p.add_argument("--num-threads", type=worker_count, default=None, help="SentencePiece training threads")
    p.add_argument("--verbose", action="store_true", help="show SentencePiece's log")
    p.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in --out (never a store)")

    p = sub.add_parser("shard", help="tokenise a corpus into a token store")
    _add_input_args(p)
    p.add_argument("--tokenizer", required=True, help="'bytes' or a tokenizer folder")
    add_store_output_args(p)
    p.add_argument("--num-proc", type=worker_count, default=min(8, os.cpu_count() or 1), help="tokenising processes")
    p.add_argument(
        "--val-fraction",
        type=_fraction,
        default=0.0,
        help="share of the --input documents (every 1/F-th) put in the validation split; default 0: "
        "no validation split (training then needs evaluation off), said as a warning",
    )
    p.add_argument(
        "--val-input", nargs="+", default=[], help="files/folders whose documents all go to the validation split"
    )

    p = sub.add_parser("inspect", help="counts and a decoded sample of a store")
    p.add_argument("store", help="store folder, or 'builtin'")
    p.add_argument("--tokens", type=int_at_least(0), default=300, help="tokens of the sample to decode")

    p = sub.add_parser("verify", help="check every shard's size, sha256 and token range")
    p.add_argument("store")

    p = sub.add_parser("builtin", help="write the embedded default corpus as a store")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser(
        "synth",
        help="a synthetic long-range task as a store (duplication, passkey), by seed",
        description="Documents and answers: docs/long_context.md. The validation split is the grid "
        "(lengths x depths x --examples) that `reformer-eval --task` scores.",
    )
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--lengths", type=_int_list, required=True, help="document lengths in tokens, e.g. 1024,4096")
    p.add_argument("--examples", type=int_at_least(1), default=8, help="validation examples per length (x depth)")
    p.add_argument("--train-examples", type=int_at_least(0), default=0, help="train split examples (default 0)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="same seed, same store (default 0)")
    p.add_argument("--symbols", type=int_at_least(1), default=128, help="duplication: symbols 1..N (default 128)")
    p.add_argument(
        "--depths",
        type=_float_list,
        default=[0.0, 0.25, 0.5, 0.75, 1.0],
        help="passkey: needle depths in [0, 1] (default 0,0.25,0.5,0.75,1)",
    )
    p.add_argument("--key-digits", type=int_at_least(1), default=5, help="passkey: digits of the key (default 5)")
    add_store_output_args(p)
    return ap


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _inspect(path: str, n_sample: int) -> None:
    store = TokenStore.open(path)
    print(f"store       {store.name}")
    print(f"tokenizer   {store.identity}  (vocab_size {store.vocab_size}, end-of-document id {store.eod_id})")
    print(f"dtype       {store.dtype.name}")
    for s in SPLITS:
        n, d = store.num_tokens(s), store.num_documents(s)
        avg = f", {n / d:,.0f} tokens/document" if d else ""
        print(f"{s:<11} {n:,} tokens, {d:,} documents, {store.num_shards(s)} shards{avg}")
    for k, v in store.manifest.get("metadata", {}).items():
        print(f"  {k}: {v}")
    for s in SPLITS:
        n = min(n_sample, store.num_tokens(s))
        if n == 0:
            continue
        ids = store.read(s, 0, n)
        eod = np.flatnonzero(ids == store.eod_id)
        first = ids[: eod[0]] if eod.size else ids
        print(f"\n--- {s}: first {first.size} tokens, decoded{' (document ends)' if eod.size else ''} ---")
        print(store.tokenizer.decode(first))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console.setup(f"reformer-data {args.command}")
    try:
        if args.command == "tokenizer":
            tok = train_tokenizer(
                args.input,
                args.out,
                args.vocab_size,
                args.model_type,
                text_field=args.text_field,
                text_unit=args.text_unit,
                character_coverage=args.character_coverage,
                max_sentences=args.max_sentences,
                num_threads=args.num_threads,
                verbose=args.verbose,
                overwrite=args.overwrite,
            )
            print(f"wrote {args.out}: {tok.identity} (vocab_size {tok.vocab_size})")
            if tok.vocab_size < args.vocab_size:
                log.warning(
                    f"the tokenizer has {tok.vocab_size} pieces, not the {args.vocab_size} asked for: the "
                    f"corpus has too few distinct pieces for more. Set model.vocab_size >= {tok.vocab_size} "
                    f"(or train on more text)"
                )
        elif args.command == "shard":
            path = shard_corpus(
                args.input,
                args.tokenizer,
                args.out,
                shard_tokens=args.shard_tokens,
                num_proc=args.num_proc,
                text_field=args.text_field,
                text_unit=args.text_unit,
                val_fraction=args.val_fraction,
                val_inputs=args.val_input,
                overwrite=args.overwrite,
            )
            print_summary(path.parent)
            _warn_without_validation(path.parent)
        elif args.command == "inspect":
            _inspect(args.store, args.tokens)
        elif args.command == "verify":
            m = verify_store(args.store)
            shards = sum(len(m["splits"][s]["shards"]) for s in m["splits"])
            tokens = sum(m["splits"][s]["num_tokens"] for s in m["splits"])
            print(f"OK {args.store}: {shards} shards, {tokens:,} tokens, checksums and token range verified")
        elif args.command == "builtin":
            print_summary(write_builtin(args.out, overwrite=args.overwrite).parent)
        elif args.command == "synth":
            spec = SynthSpec(
                args.task,
                args.lengths,
                examples=args.examples,
                train_examples=args.train_examples,
                seed=args.seed,
                n_symbols=args.symbols,
                depths=tuple(args.depths),
                key_digits=args.key_digits,
            )
            print_summary(
                write_synthetic(spec, args.out, overwrite=args.overwrite, shard_tokens=args.shard_tokens).parent
            )
    except DataError as e:
        log.error(str(e))
        return ExitCode.USAGE if isinstance(e, UsageError) else ExitCode.FAILED
    return ExitCode.OK


def _warn_without_validation(store_dir: Path) -> None:
    if read_manifest(store_dir)["splits"]["validation"]["num_tokens"] == 0:
        log.warning(
            "the store has no validation split. Training on it needs evaluation off (--set eval.every=0 "
            "--set eval.at_end=false); to evaluate, shard again with --val-fraction 0.01 (every 100th "
            "document) or --val-input held_out/"
        )


def print_summary(store_dir: Path) -> None:
    """One line: the store written, its tokenizer and dtype, tokens / documents / shards per split."""
    m = read_manifest(store_dir)
    parts = [
        f"{s} {v['num_tokens']:,} tokens / {v['num_documents']:,} documents / {len(v['shards'])} shards"
        for s, v in m["splits"].items()
    ]
    print(f"wrote {store_dir} ({m['tokenizer']['identity']}, {m['dtype']}): " + "; ".join(parts))


if __name__ == "__main__":
    sys.exit(main())
