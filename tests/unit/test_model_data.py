"""The record of what a model was trained on (data/model_data.py), as `reformer-ckpt consolidate` writes it from
a checkpoint's run config: the tokenizer the run's store names, a SentencePiece model copied and checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reformer_dist.data.errors import DataError
from reformer_dist.data.model_data import read_record, record_files_from_run_config, record_tokenizer
from reformer_dist.data.pipeline import shard_corpus, train_tokenizer
from reformer_dist.ondisk import TOKENIZER_MODEL, TRAINING_DATA

TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n"


def _write(folder: Path, files: dict[str, str | bytes]) -> Path:
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return folder


def test_record_from_a_sentencepiece_store_copies_its_model(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT * 40)
    tok = train_tokenizer([tmp_path / "corpus.txt"], tmp_path / "tok", vocab_size=300, num_threads=1)
    store = shard_corpus([tmp_path / "corpus.txt"], tmp_path / "tok", tmp_path / "store").parent
    data = {"path": str(store), "seq_len": 64, "document_masking": True, "reset_positions": False}
    files = record_files_from_run_config(data, "ckpt/run_config.json", vocab_size=300)
    assert list(files) == [TOKENIZER_MODEL, TRAINING_DATA]  # the model first: the record names it
    assert files[TOKENIZER_MODEL] == (tmp_path / "tok" / TOKENIZER_MODEL).read_bytes()
    rec = read_record(_write(tmp_path / "weights", files))
    assert rec is not None
    assert (rec["tokenizer"], rec["vocab_size"], rec["eod_id"]) == (tok.identity, 300, tok.eod_id)
    assert (rec["seq_len"], rec["document_masking"], rec["reset_positions"]) == (64, True, False)
    # the folder decodes by itself: the copied model, checked against the identity
    back = record_tokenizer(rec)
    assert back.identity == tok.identity and back.decode(back.encode("lazy dog")) == "lazy dog"


def test_record_from_the_builtin_corpus_is_bytes_without_a_model_file(tmp_path):
    files = record_files_from_run_config({"path": "builtin", "seq_len": 256}, "ckpt/run_config.json", vocab_size=257)
    assert list(files) == [TRAINING_DATA]
    rec = json.loads(files[TRAINING_DATA])
    assert (rec["tokenizer"], rec["tokenizer_file"], rec["eod_id"], rec["store"]) == ("bytes", None, 256, "builtin")


def test_record_names_what_it_cannot_tell(tmp_path):
    gone = str(tmp_path / "deleted_store")
    with pytest.raises(DataError, match=r"ckpt/run_config.json: its store .*deleted_store is gone"):
        record_files_from_run_config({"path": gone}, "ckpt/run_config.json", vocab_size=300)
    # only an identity recorded: a SentencePiece model cannot be made up from it
    with pytest.raises(DataError, match=r"trained with sentencepiece:ab12, but its tokenizer model is not here"):
        record_files_from_run_config(
            {"path": gone, "tokenizer": "sentencepiece:ab12"}, "ckpt/run_config.json", vocab_size=300
        )
