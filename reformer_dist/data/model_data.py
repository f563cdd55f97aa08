"""What a model was trained on, recorded with its weights: `training_data.json` (+ `tokenizer.model`).

The trainer writes it into `<run>/model/` beside the weights, so `reformer-eval` can refuse a store
tokenised differently and `reformer-generate` can decode with the model's own tokenizer. A SentencePiece
model is copied into the folder (checked against its identity when loaded), so the folder decodes by
itself wherever it is moved::

    {"format": "reformer_dist.training_data/1", "tokenizer": "bytes" | "sentencepiece:<sha256>",
     "tokenizer_file": "tokenizer.model" | null, "vocab_size", "eod_id", "store", "seq_len",
     "document_masking", "reset_positions"}

`reformer-ckpt consolidate` writes the same record from the checkpoint's `run_config.json`
(`record_files_from_run_config`). Weights folders written before this record existed (a run's `model/` or a
consolidated folder of an older version) get the same facts from the run config they came from
(`record_from_run_config`): the run folder's `config.toml`, or a checkpoint's `run_config.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reformer_dist.data.errors import DataError
from reformer_dist.data.manifest import MANIFEST, read_manifest
from reformer_dist.data.tokenizers import BYTES, SYMBOLS_PREFIX, SentencePieceTokenizer, Tokenizer, load_tokenizer
from reformer_dist.ondisk import TOKENIZER_MODEL, TRAINING_DATA

FORMAT = "reformer_dist.training_data/1"
BUILTIN = "builtin"


def make_record(tokenizer: Tokenizer, data: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """The record of a run's tokenizer and its `[data]` options (`DataConfig.to_dict()` or a run config's)."""
    return {
        "format": FORMAT,
        "tokenizer": tokenizer.identity,
        "tokenizer_file": TOKENIZER_MODEL if tokenizer.model_file is not None else None,
        "vocab_size": int(vocab_size),
        "eod_id": int(tokenizer.eod_id),
        "store": str(data.get("path")),
        "seq_len": data.get("seq_len"),
        "document_masking": bool(data.get("document_masking", False)),
        "reset_positions": bool(data.get("reset_positions", False)),
    }


def record_files(tokenizer: Tokenizer, data: dict[str, Any], vocab_size: int) -> dict[str, str | bytes]:
    """The files of the record (name -> content): a copy of a SentencePiece model first, then
    `training_data.json`; a weights folder's writer takes them as extra files (so they are in its checksums)."""
    files: dict[str, str | bytes] = {}
    if tokenizer.model_file is not None:
        files[TOKENIZER_MODEL] = Path(tokenizer.model_file).read_bytes()
    files[TRAINING_DATA] = json.dumps(make_record(tokenizer, data, vocab_size), indent=2) + "\n"
    return files


def read_record(folder: str | Path) -> dict[str, Any] | None:
    """The folder's `training_data.json`, or None when it has none; DataError naming it when unreadable."""
    p = Path(folder) / TRAINING_DATA
    if not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{p}: unreadable ({e})") from None
    if not isinstance(rec, dict) or rec.get("format") != FORMAT or "tokenizer" not in rec:
        raise DataError(f"{p}: not a {FORMAT} record")
    rec["_where"], rec["_folder"] = str(p), str(folder)
    return rec


def record_from_run_config(data: dict[str, Any], where: str) -> dict[str, Any] | None:
    """The record a run config's `[data]` section implies (its store's tokenizer), or None when the store it
    names is gone and `data.tokenizer` does not say either."""
    path = str(data.get("path", BUILTIN))
    rec: dict[str, Any] = {
        "format": FORMAT,
        "store": path,
        "seq_len": data.get("seq_len"),
        "document_masking": bool(data.get("document_masking", False)),
        "reset_positions": bool(data.get("reset_positions", False)),
        "_where": where,
    }
    if path == BUILTIN:
        tok = load_tokenizer(BYTES)
        return {
            **rec,
            "tokenizer": tok.identity,
            "tokenizer_file": None,
            "eod_id": tok.eod_id,
            "vocab_size": tok.vocab_size,
        }
    if (Path(path) / MANIFEST).is_file():
        m = read_manifest(path)
        file = m["tokenizer"].get("file")
        return {
            **rec,
            "tokenizer": m["tokenizer"]["identity"],
            "eod_id": m["eod_id"],
            "vocab_size": m["vocab_size"],
            "tokenizer_file": file,
            "_folder": path,
        }
    if data.get("tokenizer"):
        return {**rec, "tokenizer": str(data["tokenizer"]), "tokenizer_file": None, "eod_id": None}
    return None


def record_files_from_run_config(data: dict[str, Any], where: str, vocab_size: int) -> dict[str, str | bytes]:
    """`record_files` for weights made from a checkpoint (`reformer-ckpt consolidate`): the tokenizer its run
    config's `[data]` implies, checked against its identity. DataError saying why when it cannot be told (the
    store is gone and only a SentencePiece identity is recorded, or its model file is missing)."""
    rec = record_from_run_config(data, where)
    if rec is None:
        raise DataError(f"{where}: its store {data.get('path')} is gone and data.tokenizer is not recorded")
    return record_files(record_tokenizer(rec), data, vocab_size)


def record_tokenizer(rec: dict[str, Any]) -> Tokenizer:
    """The tokenizer a record names: bytes, or the SentencePiece model beside it (checked against the identity)."""
    identity = rec["tokenizer"]
    if identity == BYTES or identity.startswith(SYMBOLS_PREFIX):
        return load_tokenizer(identity)
    file, folder = rec.get("tokenizer_file"), rec.get("_folder")
    if not file or not folder or not (Path(folder) / file).is_file():
        raise DataError(
            f"{rec['_where']}: the model was trained with {identity}, but its tokenizer model is not "
            f"here; pass --tokenizer with the tokenizer folder (or the store) it was trained with"
        )
    tok = SentencePieceTokenizer(Path(folder) / file)
    if tok.identity != identity:
        raise DataError(
            f"{Path(folder) / file}: tokenizer model does not match identity {identity} (recorded in {rec['_where']})"
        )
    return tok
