"""Corpus -> tokenizer, and corpus -> tokenised shards (what ``reformer-data tokenizer|shard`` run).

Sharding: documents are streamed from the source files into a ``datasets`` Arrow table (on disk,
memory-mapped: the corpus need not fit in RAM), tokenised with ``map(num_proc=P)``, and appended in
corpus order to a ``ShardWriter``. The Arrow cache lives in a hidden folder inside the writer's
staging folder (same disk as the result) and is removed before the store is committed.

Validation split: the documents of ``val_inputs`` (files you hold out yourself, e.g. the tail of a
single-document corpus like enwik8), plus, with ``val_fraction`` f, whole documents of ``inputs``
spread evenly through it: document i goes to validation when floor((i+1)*f) > floor(i*f), i.e.
every 1/f-th document. Deterministic, no random state.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reformer_dist.data.errors import DataError, UsageError
from reformer_dist.data.manifest import MANIFEST, dtype_for_vocab
from reformer_dist.data.sources import collect_files, iter_documents
from reformer_dist.data.tokenizers import SentencePieceTokenizer, Tokenizer, load_tokenizer, train_sentencepiece
from reformer_dist.data.writer import ShardWriter, check_token_range
from reformer_dist.ondisk import DATASETS_CACHE_PREFIX, TOKENIZER_MODEL, OverlapError, check_out_apart


def validation_mask(indices: np.ndarray | Sequence[int], fraction: float) -> np.ndarray:
    """True for the documents (by corpus index) that belong to the validation split."""
    i = np.asarray(indices, dtype=np.float64)
    return np.floor((i + 1) * fraction) > np.floor(i * fraction)


def train_tokenizer(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    vocab_size: int,
    model_type: str = "bpe",
    *,
    text_field: str = "text",
    text_unit: str = "document",
    overwrite: bool = False,
    **options: Any,
) -> SentencePieceTokenizer:
    """Train a SentencePiece tokenizer on the documents of ``inputs`` (streamed). See train_sentencepiece.
    An existing tokenizer in ``out_dir`` is replaced only with ``overwrite``; a token store never is."""
    check_out_outside_inputs(out_dir, inputs)
    check_tokenizer_out(out_dir, overwrite)
    files = collect_files(inputs)
    meta = {"inputs": [str(p) for p in inputs], "files": len(files), "text_field": text_field, "text_unit": text_unit}
    with tempfile.TemporaryDirectory(prefix="reformer-data-") as cache:
        docs = (d.text for d in iter_documents(files, text_field, text_unit, cache_dir=cache))
        try:
            return train_sentencepiece(docs, out_dir, vocab_size, model_type, metadata=meta, **options)
        except DataError as e:
            if str(e).startswith("empty corpus"):
                raise DataError(f"{e}: {_describe(files)}") from None
            raise


def shard_corpus(
    inputs: Sequence[str | Path],
    tokenizer: str | Path | Tokenizer,
    out_dir: str | Path,
    *,
    shard_tokens: int = 1 << 27,
    num_proc: int = 1,
    text_field: str = "text",
    text_unit: str = "document",
    val_fraction: float = 0.0,
    val_inputs: Sequence[str | Path] = (),
    overwrite: bool = False,
) -> Path:
    """Tokenise ``inputs`` into a token store at ``out_dir``; returns the manifest path."""
    # datasets takes ~1.5 s to import; this module is also imported for validation_mask (the built-in
    # corpus, which every default run opens) and by the CLI
    import datasets

    workers_die_with_parent()
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1) (got {val_fraction})")
    check_out_outside_inputs(out_dir, [*inputs, *val_inputs])
    files = collect_files(inputs)
    val_files = collect_files(val_inputs) if val_inputs else []
    if both := set(map(str, files)) & set(map(str, val_files)):
        raise DataError(f"{sorted(both)[0]}: given both as input and as validation input")
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    dtype = dtype_for_vocab(tok.vocab_size)
    meta = {
        "inputs": [str(p) for p in inputs],
        "files": len(files),
        "text_field": text_field,
        "text_unit": text_unit,
        "val_fraction": val_fraction,
        "val_inputs": [str(p) for p in val_inputs],
        "shard_tokens": shard_tokens,
    }
    out = Path(out_dir)
    with ShardWriter(out, tok, shard_tokens, overwrite=overwrite, metadata=meta) as writer:
        cache = Path(tempfile.mkdtemp(prefix=DATASETS_CACHE_PREFIX, dir=writer.staging))
        try:
            empty = f"empty corpus: no non-empty document in {_describe(files + val_files)}"
            with _original_error(empty=empty):  # datasets versions differ: an error, or 0 rows
                docs = datasets.Dataset.from_generator(
                    _generate,
                    gen_kwargs={
                        "files": [str(f) for f in files + val_files],
                        "held_out": [False] * len(files) + [True] * len(val_files),
                        "text_field": text_field,
                        "text_unit": text_unit,
                        "cache_dir": str(cache),
                    },
                    features=datasets.Features(
                        {
                            "text": datasets.Value("large_string"),
                            "source": datasets.Value("string"),
                            "validation": datasets.Value("bool"),
                        }
                    ),
                    num_proc=min(num_proc, len(files) + len(val_files)) if num_proc > 1 else None,
                    cache_dir=str(cache),
                )
            if len(docs) == 0:
                raise DataError(empty)
            with _original_error():
                tokens = docs.map(
                    _tokenize,
                    batched=True,
                    batch_size=256,
                    with_indices=True,
                    num_proc=num_proc if num_proc > 1 else None,
                    remove_columns=["text"],
                    fn_kwargs={"tokenizer": tok, "val_fraction": val_fraction, "dtype": dtype.name},
                    features=datasets.Features(
                        {
                            "source": datasets.Value("string"),
                            "ids": datasets.Sequence(datasets.Value(dtype.name)),
                            "validation": datasets.Value("bool"),
                        }
                    ),
                    # fresh cache folder per run, so a fixed fingerprint cannot pick up stale results
                    new_fingerprint=hashlib.sha256(f"{tok.identity} {val_fraction}".encode()).hexdigest()[:32],
                    desc="tokenise",
                )
            _write(tokens, writer)
            if val_files and writer.num_tokens("validation") == 0:
                raise DataError(f"empty validation corpus: no non-empty document in {_describe(val_files)}")
            if val_fraction > 0 and writer.num_tokens("validation") == 0:
                raise DataError(
                    f"val_fraction {val_fraction} of {len(docs)} documents selects none for validation "
                    f"({_describe(files)}): use more documents, a larger fraction, or validation inputs"
                )
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    return out / MANIFEST


_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_fork_parent = [0]  # the pid that is forking, recorded just before each fork (read in the child)
_registered = [False]


def _die_with(parent: int) -> None:
    """In a forked child: have Linux SIGKILL it when its parent dies (a SIGKILLed `shard` otherwise leaves its
    tokenising workers blocked on a pipe for good); exit at once if the parent died before this ran."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):  # not Linux: nothing to ask for
        return
    if parent and os.getppid() != parent:
        os._exit(1)


def workers_die_with_parent() -> None:
    """Every process this one forks from now on (the ``datasets`` worker pools of ``shard``) dies with it."""
    if _registered[0] or not sys.platform.startswith("linux"):
        return
    _registered[0] = True
    os.register_at_fork(
        before=lambda: _fork_parent.__setitem__(0, os.getpid()), after_in_child=lambda: _die_with(_fork_parent[0])
    )


def check_out_outside_inputs(out_dir: str | Path, inputs: Sequence[str | Path]) -> None:
    """UsageError when the store would be written into (or over) an input folder: it would join its own corpus.
    (A store folder that holds an input file is allowed: a rewrite carries the user's files over.)"""
    folders = [item for item in inputs if not any(ch in str(item) for ch in "*?[") and Path(item).is_dir()]
    try:  # a pattern names files, not a folder to keep clear
        check_out_apart(
            out_dir,
            folders,
            containing=False,
            why="the store would become part of the corpus it is made from (and break the next shard of it)",
        )
    except OverlapError as e:
        raise UsageError(str(e)) from None


def check_tokenizer_out(out_dir: str | Path, overwrite: bool) -> None:
    """UsageError when ``out_dir`` holds a token store (a tokenizer written there would change the store's
    tokenizer without its identity: `verify` and training would refuse it), or a tokenizer and not ``overwrite``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file; the tokenizer needs a folder")
    if (out / MANIFEST).is_file():
        raise UsageError(
            f"--out {out} holds a token store ({MANIFEST}); a tokenizer written there would replace the "
            f"store's own {TOKENIZER_MODEL} and break its tokenizer identity; choose another folder"
        )
    if (out / TOKENIZER_MODEL).is_file() and not overwrite:
        raise UsageError(
            f"--out {out} already holds a tokenizer ({TOKENIZER_MODEL}); pass --overwrite to replace it "
            "(stores made with it will no longer match it), or choose another folder"
        )


def _generate(files: list[str], held_out: list[bool], text_field: str, text_unit: str, cache_dir: str):
    validation = dict(zip(files, held_out))
    for doc in iter_documents(files, text_field, text_unit, cache_dir):
        yield {"text": doc.text, "source": f"{doc.source}:{doc.index}", "validation": validation[doc.source]}


def _tokenize(batch: dict[str, list], indices: list[int], tokenizer: Tokenizer, val_fraction: float, dtype: str):
    ids = []
    for arr, source in zip(tokenizer.encode_batch(batch["text"]), batch["source"]):
        check_token_range(arr, tokenizer, source)
        doc = np.empty(arr.size + 1, dtype=dtype)
        doc[:-1] = arr
        doc[-1] = tokenizer.eod_id
        ids.append(doc)
    held_out = np.asarray(batch["validation"], dtype=bool)
    return {"source": batch["source"], "ids": ids, "validation": held_out | validation_mask(indices, val_fraction)}


def _write(tokens, writer: ShardWriter) -> None:
    """Append the tokenised documents, in corpus order, to their split (flat arrays, no per-token Python)."""
    import pyarrow.compute as pc  # datasets' dependency: loaded with it, only when sharding

    for table in tokens.with_format("arrow").iter(batch_size=256):  # documents per step (memory)
        is_val = table.column("validation").to_numpy(zero_copy_only=False)
        for split, mask in (("train", ~is_val), ("validation", is_val)):
            if mask.all():  # the common case: no filtering copy
                writer.add(split, pc.list_flatten(table.column("ids")).to_numpy())
            elif mask.any():
                writer.add(split, pc.list_flatten(table.column("ids").filter(mask)).to_numpy())


@contextlib.contextmanager
def _original_error(empty: str | None = None):
    """Re-raise a DataError that ``datasets`` wrapped (e.g. in DatasetGenerationError) as itself;
    with ``empty``, the error ``datasets`` gives for a generator that yielded nothing becomes that."""
    try:
        yield
    except DataError:
        raise
    except Exception as e:
        if empty and "corresponds to no data" in str(e):
            raise DataError(empty) from None
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


def _describe(files: Sequence[Path]) -> str:
    shown = ", ".join(str(f) for f in files[:3])
    return shown + (f" and {len(files) - 3} more files" if len(files) > 3 else "")
