"""Tokenizers: byte tokenizer, SentencePiece training (byte fallback) and exact round trips."""

from __future__ import annotations

import hashlib
import pickle
import sysconfig
from pathlib import Path

import pytest

from reformer_dist.data.errors import DataError
from reformer_dist.data.pipeline import train_tokenizer
from reformer_dist.data.tokenizers import ByteTokenizer, load_tokenizer, tokenizer_identity

UNICODE = "naïve café 日本語 🙂"
TRICKY = [
    UNICODE,
    "  two  spaces\n\n\ttab\r\n",
    " leading space",
    "a\u2581b \u2581 c",  # SentencePiece's own space marker must survive too
    "</s><s><unk> are just text",
    "\x00\x7f binary-ish",
    "",
]


def corpus_dir(tmp_path: Path) -> Path:
    """A few KB of Python source plus non-ASCII lines."""
    d = tmp_path / "corpus"
    d.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (d / "a.py").write_text((stdlib / "abc.py").read_text(encoding="utf-8")[:4000], encoding="utf-8")
    (d / "b.txt").write_text((UNICODE + "\n") * 5 + "the quick brown fox\n" * 20, encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sp")
    out = tmp / "tok"
    train_tokenizer([corpus_dir(tmp)], out, vocab_size=320, model_type="bpe", character_coverage=0.98, num_threads=1)
    return out


def test_byte_tokenizer_round_trip_and_specials():
    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eod_id, tok.identity) == (257, 256, "bytes")
    for text in TRICKY:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
        assert tok.decode(ids + [tok.eod_id]) == text  # specials are dropped on decode
    assert [a.tolist() for a in tok.encode_batch(["ab", "é"])] == [[97, 98], [195, 169]]


def test_sentencepiece_round_trip_with_byte_fallback(sp_dir: Path):
    tok = load_tokenizer(sp_dir)
    assert tok.vocab_size == 320
    assert tok.identity == "sentencepiece:" + hashlib.sha256((sp_dir / "tokenizer.model").read_bytes()).hexdigest()
    assert tokenizer_identity(sp_dir) == tok.identity
    assert (sp_dir / "tokenizer.json").is_file() and (sp_dir / "tokenizer.vocab").is_file()
    for text in TRICKY + ["Ωμέγα ∑ never seen in training ✓"]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size and i != tok.eod_id for i in ids)
        assert tok.decode(ids) == text
    batch = tok.encode_batch(TRICKY)
    assert [tok.decode(a) for a in batch] == TRICKY
    # it learned merges: common text takes fewer tokens than bytes
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")


def test_sentencepiece_pickles_by_value(sp_dir: Path):
    tok = load_tokenizer(sp_dir)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.identity == tok.identity and clone.encode(UNICODE) == tok.encode(UNICODE)


def test_unigram_trains(tmp_path: Path):
    tok = train_tokenizer(
        [corpus_dir(tmp_path)],
        tmp_path / "uni",
        vocab_size=320,
        model_type="unigram",
        character_coverage=0.98,
        num_threads=1,
    )
    assert tok.decode(tok.encode(UNICODE)) == UNICODE


def test_tokenizer_bad_inputs_name_the_file(tmp_path: Path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty corpus.*empty.txt"):
        train_tokenizer([empty], tmp_path / "t", vocab_size=300)
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"body": "hello"}\n')
    with pytest.raises(DataError, match=r"rows.jsonl.*no text field 'text'.*body"):
        train_tokenizer([bad], tmp_path / "t", vocab_size=300)
    with pytest.raises(DataError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(DataError, match="identity, not a location"):
        load_tokenizer("sentencepiece:abc")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(DataError, match="junk.model"):
        load_tokenizer(junk)
    with pytest.raises(DataError, match="--vocab-size 100 is too small for this corpus: it needs"):
        train_tokenizer([corpus_dir(tmp_path)], tmp_path / "t", vocab_size=100)
    assert not (tmp_path / "t" / "tokenizer.model").exists()
