"""Tokenizers: the built-in byte tokenizer, a SentencePiece wrapper, and SentencePiece training.

Every tokenizer has ``encode(str) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``, ``eod_id``
(end-of-document, appended after each document in a store) and ``identity``: "bytes",
"sentencepiece:<sha256 of the model file>", or "symbols:<vocab size>" (the synthetic tasks' abstract symbols).
A store records the identity of the tokenizer that wrote it, so a run can refuse data tokenised differently from
what its model was built for.

A tokenizer directory holds ``tokenizer.model`` (the SentencePiece model: all that loading needs),
``tokenizer.vocab`` (pieces and scores, for reading) and ``tokenizer.json`` (identity and the options
it was trained with).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import sentencepiece as spm

from reformer_dist.data.errors import DataError
from reformer_dist.ondisk import TOKENIZER_META, TOKENIZER_MODEL, TOKENIZER_VOCAB, AtomicFile, atomic_write

BYTES = "bytes"
SP_PREFIX = "sentencepiece:"
SYMBOLS_PREFIX = "symbols:"
# SentencePiece writes U+2581 for a space and cannot give it back as itself; such characters are
# encoded as their byte-fallback pieces instead (see SentencePieceTokenizer.encode).
_SP_SPACE = "\u2581"
# Lines longer than this are cut for SentencePiece training (it skips over-long "sentences").
_TRAIN_PIECE_CHARS = 4000


class Tokenizer(Protocol):
    """What the pipeline, the store and the trainer need from a tokenizer."""

    identity: str
    vocab_size: int
    eod_id: int

    @property
    def model_file(self) -> Path | None: ...  # file a store copies to stay self-contained; None = nothing to copy

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, and 256 = end-of-document. Needs no training."""

    identity = BYTES
    vocab_size = 257
    eod_id = 256
    model_file = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Bytes back to text; special ids are dropped, invalid UTF-8 (a cut window) becomes U+FFFD."""
        arr = np.asarray(ids)
        return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class SymbolTokenizer:
    """Abstract symbols (the synthetic tasks, data/synthetic.py): ids 0..vocab_size-2 are symbols written as
    numbers separated by spaces, vocab_size-1 = end-of-document. Identity ``symbols:<vocab_size>``."""

    model_file = None

    def __init__(self, vocab_size: int):
        if vocab_size < 2:
            raise DataError(
                f"{SYMBOLS_PREFIX}{vocab_size}: a symbol vocabulary needs at least one symbol and "
                "the end-of-document id"
            )
        self.vocab_size = int(vocab_size)
        self.eod_id = self.vocab_size - 1
        self.identity = f"{SYMBOLS_PREFIX}{self.vocab_size}"

    def encode(self, text: str) -> list[int]:
        """Whitespace-separated symbol numbers; DataError naming the first one that is not a symbol."""
        ids = []
        for word in text.split():
            if not word.isdigit() or int(word) >= self.eod_id:
                raise DataError(
                    f"{word!r} is not a symbol of {self.identity} (expected numbers 0..{self.eod_id - 1} "
                    "separated by spaces)"
                )
            ids.append(int(word))
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(self.encode(t), dtype=np.int64) for t in texts]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Symbols as numbers separated by spaces; the end-of-document id as a line break."""
        lines: list[list[str]] = [[]]
        for i in ids:
            if int(i) == self.eod_id:
                lines.append([])
            else:
                lines[-1].append(str(int(i)))
        return "\n".join(" ".join(line) for line in lines)

    def __repr__(self) -> str:
        return f"SymbolTokenizer({self.vocab_size})"


class SentencePieceTokenizer:
    """A SentencePiece model with byte fallback (no text is ever unknown); EOD = its ``</s>`` id."""

    def __init__(self, model_file: str | Path):
        self.model_file = Path(model_file)
        try:
            proto = self.model_file.read_bytes()
        except OSError as e:
            raise DataError(f"{self.model_file}: cannot read SentencePiece model: {e}") from e
        self._load(proto)

    def _load(self, proto: bytes) -> None:
        self._proto = proto
        self.identity = SP_PREFIX + hashlib.sha256(proto).hexdigest()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with its own text
            raise DataError(f"{self.model_file}: not a SentencePiece model: {e}") from e
        self.vocab_size = int(self._sp.get_piece_size())
        self.eod_id = int(self._sp.eos_id())
        if self.eod_id < 0:
            raise DataError(f"{self.model_file}: model has no end-of-sentence piece to use as end-of-document")
        byte_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
        if not all(self._sp.is_byte(i) for i in byte_ids):
            raise DataError(
                f"{self.model_file}: model was trained without byte_fallback, so some text would be "
                "unknown; train one with `reformer-data tokenizer`"
            )
        self._byte_ids = byte_ids
        self._space_ids = [byte_ids[b] for b in _SP_SPACE.encode("utf-8")]

    # Pickled by model bytes so `datasets.map(num_proc=P)` can ship it to worker processes.
    def __getstate__(self) -> dict[str, Any]:
        return {"model_file": str(self.model_file), "proto": self._proto}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.model_file = Path(state["model_file"])
        self._load(state["proto"])

    def encode(self, text: str) -> list[int]:
        if _SP_SPACE not in text:
            return self._sp.encode(text)
        out: list[int] = []
        for i, part in enumerate(text.split(_SP_SPACE)):
            if i:
                out.extend(self._space_ids)
            out.extend(self._sp.encode(part))
        return out

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        if any(_SP_SPACE in t for t in texts):
            return [np.asarray(self.encode(t), dtype=np.int64) for t in texts]
        return [np.asarray(ids, dtype=np.int64) for ids in self._sp.encode(list(texts))]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.model_file)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(spec: str | Path) -> ByteTokenizer | SymbolTokenizer | SentencePieceTokenizer:
    """``"bytes"`` -> ByteTokenizer; ``"symbols:<V>"`` -> SymbolTokenizer; a directory holding tokenizer.model
    (or the .model file itself) -> SentencePieceTokenizer."""
    if str(spec) == BYTES:
        return ByteTokenizer()
    if str(spec).startswith(SYMBOLS_PREFIX):
        n = str(spec)[len(SYMBOLS_PREFIX) :]
        if not n.isdigit():
            raise DataError(f"{spec!r}: expected {SYMBOLS_PREFIX}<vocabulary size>")
        return SymbolTokenizer(int(n))
    if str(spec).startswith(SP_PREFIX):
        raise DataError(f"{spec!r} is an identity, not a location: pass the tokenizer directory")
    path = Path(spec)
    if path.is_dir():
        path = path / TOKENIZER_MODEL
    if not path.is_file():
        raise DataError(
            f"{spec}: no tokenizer here (expected 'bytes', a folder with {TOKENIZER_MODEL}, or a .model file)"
        )
    return SentencePieceTokenizer(path)


def tokenizer_identity(spec: str | Path) -> str:
    """The identity string for an identity or anything ``load_tokenizer`` accepts."""
    s = str(spec)
    if s == BYTES or s.startswith(SP_PREFIX):
        return s
    if s.startswith(SYMBOLS_PREFIX):
        return load_tokenizer(s).identity
    return load_tokenizer(spec).identity


def train_sentencepiece(
    documents: Iterable[str],
    out_dir: str | Path,
    vocab_size: int,
    model_type: str = "bpe",
    *,
    character_coverage: float = 0.9995,
    max_sentences: int = 1_000_000,
    num_threads: int | None = None,
    verbose: bool = False,
    metadata: dict[str, Any] | None = None,
) -> SentencePieceTokenizer:
    """Train a byte-fallback SentencePiece model from documents streamed through ``sentence_iterator``.

    Documents are cut into lines. At most ``max_sentences`` lines are kept (reservoir-sampled by
    SentencePiece), so memory stays bounded however large the corpus. Text is not normalised and
    whitespace is kept as is, so decode(encode(text)) == text.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram' (got {model_type!r})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = {"documents": 0, "lines": 0}
    failure: list[BaseException] = []

    def lines() -> Iterable[str]:
        # An exception raised inside the C++ trainer's callback loses its type: keep it to re-raise.
        try:
            for doc in documents:
                stats["documents"] += 1
                for line in doc.splitlines():
                    for k in range(0, len(line), _TRAIN_PIECE_CHARS):
                        stats["lines"] += 1
                        yield line[k : k + _TRAIN_PIECE_CHARS]
        except Exception as e:  # noqa: BLE001 - re-raised after training
            failure.append(e)

    model_path = out / TOKENIZER_MODEL
    options: dict[str, Any] = dict(
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=character_coverage,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=4 * _TRAIN_PIECE_CHARS + 16,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=0 if verbose else 2,
    )
    try:
        with AtomicFile(model_path) as f:  # a failed training leaves no model file behind
            spm.SentencePieceTrainer.train(sentence_iterator=lines(), model_writer=f, **options)
            if failure:
                raise failure[0]
    except RuntimeError as e:
        if failure:
            raise failure[0] from None
        if stats["lines"] == 0:
            raise DataError(f"empty corpus: no text to train a tokenizer on ({stats['documents']} documents)") from e
        need = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", str(e))
        if need:  # SentencePiece's own text names its C++ flags (--character_coverage), not ours
            raise DataError(
                f"--vocab-size {vocab_size} is too small for this corpus: it needs {need.group(2)} pieces for the "
                f"256 byte-fallback pieces, 3 special ones and the characters that --character-coverage "
                f"{character_coverage} keeps; use --vocab-size >= {need.group(2)} (or a lower --character-coverage)"
            ) from None
        raise DataError(f"SentencePiece training failed: {e}") from e
    tok = SentencePieceTokenizer(model_path)
    atomic_write(
        out / TOKENIZER_VOCAB,
        "".join(f"{tok._sp.id_to_piece(i)}\t{tok._sp.get_score(i)}\n" for i in range(tok.vocab_size)),
    )
    meta = {
        "identity": tok.identity,
        "vocab_size": tok.vocab_size,
        "eod_id": tok.eod_id,
        "trained_on": {**stats, **(metadata or {})},
        "options": {k: v for k, v in options.items() if k not in ("num_threads", "minloglevel")},
    }
    atomic_write(out / TOKENIZER_META, json.dumps(meta, indent=2) + "\n")
    return tok
