"""Corpus -> shards -> TokenStore: exact round trips, manifest, atomic writes, and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reformer_dist.data.errors import DataError
from reformer_dist.data.pipeline import shard_corpus, train_tokenizer, validation_mask
from reformer_dist.data.store import TokenStore
from reformer_dist.data.tokenizers import load_tokenizer
from reformer_dist.data.verify import verify_store
from reformer_dist.data.writer import ShardWriter
from reformer_dist.ondisk import STORE_MANIFEST as MANIFEST

DOCS = [
    "def f(x):\n    return x + 1\n",
    "naïve café 日本語 🙂",
    "  leading spaces, trailing newline\n\n",
    "a\u2581b",
    "x" * 500,
    "tabs\tand\r\nCRLF",
    "last one",
]


class StubTokenizer:
    """Tokenizer stand-in: fixed vocabulary, maps each character to its code point."""

    def __init__(self, vocab_size: int = 300, identity: str = "test:stub"):
        self.vocab_size, self.eod_id, self.identity, self.model_file = vocab_size, vocab_size - 1, identity, None

    def encode_batch(self, texts):
        return [np.array([ord(c) for c in t], dtype=np.int64) for t in texts]


def documents(store: TokenStore, split: str) -> list[str]:
    """Decode a split back into its documents (split at end-of-document ids)."""
    ids = store.read(split, 0, store.num_tokens(split))
    assert ids[-1] == store.eod_id  # every document is terminated
    ends = np.flatnonzero(ids == store.eod_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [store.tokenizer.decode(ids[a:b]) for a, b in zip(starts, ends)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_text_folder_round_trip_bytes(tmp_path: Path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(DOCS):
        (corpus / f"doc{i:02d}.txt").write_bytes(doc.encode("utf-8"))
    (corpus / ".hidden").write_text("must be skipped")
    expected = [d.replace("\r\n", "\n") for d in DOCS]  # plain text is read with universal newlines
    manifest = shard_corpus([corpus], "bytes", tmp_path / "store", shard_tokens=64, num_proc=2, val_fraction=0.3)
    store = TokenStore.open(manifest.parent, expect_tokenizer="bytes", verify=True)
    val = validation_mask(np.arange(len(DOCS)), 0.3)
    assert documents(store, "train") == [d for d, v in zip(expected, val) if not v]
    assert documents(store, "validation") == [d for d, v in zip(expected, val) if v]

    m = json.loads(manifest.read_text())
    assert m["dtype"] == "uint16" and m["vocab_size"] == 257 and m["tokenizer"]["identity"] == "bytes"
    train = m["splits"]["train"]
    assert len(train["shards"]) > 1 and all(s["num_tokens"] == 64 for s in train["shards"][:-1])
    assert train["num_documents"] == sum(s["num_documents"] for s in train["shards"]) == int((~val).sum())
    assert train["num_tokens"] == sum(len(d.encode()) + 1 for d, v in zip(expected, val) if not v)
    assert not any(p.name.startswith(".") for p in manifest.parent.iterdir())  # no temp/cache left


def test_jsonl_and_parquet_round_trip_with_text_field(tmp_path: Path):
    write_jsonl(tmp_path / "a.jsonl", [{"body": d, "id": i} for i, d in enumerate(DOCS[:4])])
    pq.write_table(pa.table({"body": DOCS[4:], "n": list(range(3))}), tmp_path / "b.parquet")
    manifest = shard_corpus(
        [tmp_path / "a.jsonl", tmp_path / "b.parquet"],
        "bytes",
        tmp_path / "store",
        text_field="body",
        shard_tokens=1000,
    )
    store = TokenStore.open(manifest.parent)
    assert documents(store, "train") == DOCS  # JSON/Parquet text is exact, \r\n included
    assert store.num_tokens("validation") == 0 and store.num_documents("train") == len(DOCS)


def test_sentencepiece_store_round_trip(tmp_path: Path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "docs.jsonl", [{"text": d} for d in DOCS * 3])
    (corpus / "more.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 30)
    tok = train_tokenizer([corpus], tmp_path / "tok", vocab_size=320, character_coverage=0.98, num_threads=1)
    manifest = shard_corpus([corpus / "docs.jsonl"], tmp_path / "tok", tmp_path / "store", shard_tokens=50)
    store = TokenStore.open(manifest.parent, expect_tokenizer=tok.identity)
    assert store.identity == tok.identity and store.vocab_size == 320 and store.eod_id == tok.eod_id
    assert (manifest.parent / "tokenizer.model").read_bytes() == (tmp_path / "tok" / "tokenizer.model").read_bytes()
    assert documents(store, "train") == DOCS * 3
    verify_store(manifest.parent)


def test_validation_inputs_are_held_out(tmp_path: Path):
    # enwik8-style: one big document for training, a held-out file for validation
    (tmp_path / "train.txt").write_text("t" * 300)
    (tmp_path / "valid.txt").write_text("v" * 40)
    manifest = shard_corpus(
        [tmp_path / "train.txt"],
        "bytes",
        tmp_path / "store",
        val_inputs=[tmp_path / "valid.txt"],
        shard_tokens=128,
        num_proc=2,
    )
    store = TokenStore.open(manifest.parent)
    assert documents(store, "train") == ["t" * 300] and documents(store, "validation") == ["v" * 40]
    with pytest.raises(DataError, match="train.txt: given both as input and as validation input"):
        shard_corpus(
            [tmp_path / "train.txt", tmp_path / "valid.txt"],
            "bytes",
            tmp_path / "s2",
            val_inputs=[tmp_path / "train.txt"],
        )


def test_large_vocab_uses_uint32(tmp_path: Path):
    with ShardWriter(tmp_path / "s", StubTokenizer(vocab_size=70_000), shard_tokens=10) as w:
        w.add("train", np.array([0, 69_998, 65_536, 69_999]))
    store = TokenStore.open(tmp_path / "s", verify=True)
    assert store.dtype == np.uint32 and store.read("train", 0, 4).tolist() == [0, 69_998, 65_536, 69_999]
    assert (tmp_path / "s" / "train-00000.bin").stat().st_size == 16


def test_reads_cross_shard_boundaries(tmp_path: Path):
    tokens = np.arange(1000) % 250
    with ShardWriter(tmp_path / "s", StubTokenizer(), shard_tokens=7) as w:
        w.add("train", tokens[:333])
        w.add("train", tokens[333:])
    store = TokenStore.open(tmp_path / "s")
    assert store.num_shards("train") == 143
    for start, n in [(0, 1000), (5, 9), (6, 1), (7, 7), (990, 10), (3, 0)]:
        np.testing.assert_array_equal(store.read("train", start, n), tokens[start : start + n])
    with pytest.raises(IndexError):
        store.read("train", 995, 6)


# ---------------------------------------------------------------------------------- atomicity
def test_interrupted_write_leaves_no_manifest_and_no_shards(tmp_path: Path):
    out = tmp_path / "store"
    with pytest.raises(RuntimeError, match="power cut"):
        with ShardWriter(out, load_tokenizer("bytes"), shard_tokens=10) as w:
            w.add("train", np.arange(25))  # two shards committed, one half written
            assert (w.staging / "train-00001.bin").exists() and not out.exists()
            raise RuntimeError("power cut")
    assert not out.exists()  # the write happened in a staging folder beside it, now removed
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="manifest.json: no such folder"):
        TokenStore.open(out)


def test_failure_inside_pipeline_leaves_no_manifest(tmp_path: Path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", [{"text": "fine"}] * 50)
    write_jsonl(corpus / "b.jsonl", [{"text": "fine"}, {"txt": "oops"}])
    with pytest.raises(DataError, match="b.jsonl"):
        shard_corpus([corpus], "bytes", tmp_path / "store", shard_tokens=8)
    assert not (tmp_path / "store").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_leftovers_of_a_killed_write_are_removed_by_the_next(tmp_path: Path):
    out = tmp_path / "store"
    (out / ".datasets-cache-x1").mkdir(parents=True)
    for name in (".train-00000.bin.tmp-999", "train-00007.bin", ".manifest.json.tmp-5"):
        (out / name).write_bytes(b"junk")
    (out / "README.txt").write_text("not ours")
    with ShardWriter(out, load_tokenizer("bytes"), shard_tokens=8) as w:
        w.add("train", np.arange(10))
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.txt", "manifest.json", "train-00000.bin", "train-00001.bin"]


def test_existing_store_needs_overwrite(tmp_path: Path):
    def write(**kw):
        with ShardWriter(tmp_path / "s", load_tokenizer("bytes"), shard_tokens=4, **kw) as w:
            w.add("train", np.arange(10))

    write()
    with pytest.raises(DataError, match="already holds a token store"):
        write()
    write(overwrite=True)
    assert TokenStore.open(tmp_path / "s").num_shards("train") == 3


# ---------------------------------------------------------------------------------- bad input
def test_empty_corpus_names_the_file(tmp_path: Path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty corpus.*empty.txt"):
        shard_corpus([tmp_path / "empty.txt"], "bytes", tmp_path / "store")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="nothing.*empty corpus"):
        shard_corpus([tmp_path / "nothing"], "bytes", tmp_path / "store")
    with pytest.raises(DataError, match="missing.txt: no such file"):
        shard_corpus([tmp_path / "missing.txt"], "bytes", tmp_path / "store")


def test_missing_text_field_names_the_file(tmp_path: Path):
    write_jsonl(tmp_path / "rows.jsonl", [{"content": "hello"}])
    with pytest.raises(DataError, match=r"rows.jsonl: record 0 has no text field 'text'.*content"):
        shard_corpus([tmp_path / "rows.jsonl"], "bytes", tmp_path / "store")
    pq.write_table(pa.table({"content": ["hello"]}), tmp_path / "rows.parquet")
    with pytest.raises(DataError, match=r"rows.parquet: record 0 has no text field 'text'"):
        shard_corpus([tmp_path / "rows.parquet"], "bytes", tmp_path / "store")
    write_jsonl(tmp_path / "ints.jsonl", [{"text": 5}])
    with pytest.raises(DataError, match=r"ints.jsonl: record 0: field 'text' is int"):
        shard_corpus([tmp_path / "ints.jsonl"], "bytes", tmp_path / "store")


def test_token_outside_vocabulary_names_the_file(tmp_path: Path):
    (tmp_path / "ok.txt").write_text("plain")
    (tmp_path / "wide.txt").write_text("ascii then Ā")  # code point 256 >= stub vocabulary 255
    tok = StubTokenizer(vocab_size=256)
    with pytest.raises(DataError, match=r"wide.txt:0: token id 256 outside the vocabulary 0..255"):
        shard_corpus([tmp_path / "ok.txt", tmp_path / "wide.txt"], tok, tmp_path / "store")
    assert not (tmp_path / "store" / MANIFEST).exists()
    with pytest.raises(DataError, match=r"train-00000.bin: token id 300 outside"):
        with ShardWriter(tmp_path / "w", tok, shard_tokens=8) as w:
            w.add("train", np.array([1, 300]))


def test_invalid_utf8_names_the_file(tmp_path: Path):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: cannot read as text.*UnicodeDecodeError"):
        shard_corpus([tmp_path / "latin1.txt"], "bytes", tmp_path / "store")


def test_no_validation_documents_is_an_error(tmp_path: Path):
    (tmp_path / "one.txt").write_text("a single document")
    with pytest.raises(DataError, match="selects none for validation"):
        shard_corpus([tmp_path / "one.txt"], "bytes", tmp_path / "store", val_fraction=0.1)


@pytest.fixture
def small_store(tmp_path: Path) -> Path:
    with ShardWriter(tmp_path / "store", load_tokenizer("bytes"), shard_tokens=100) as w:
        w.add("train", np.arange(250) % 256)
        w.add("validation", np.arange(50))
    return tmp_path / "store"


def test_truncated_shard_detected_at_open_and_by_verify(small_store: Path):
    shard = small_store / "train-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"train-00001.bin: shard is 198 bytes, manifest says 200"):
        TokenStore.open(small_store)
    with pytest.raises(DataError, match="train-00001.bin"):
        verify_store(small_store)
    shard.unlink()
    with pytest.raises(DataError, match="train-00001.bin: shard listed in manifest.json is missing"):
        TokenStore.open(small_store)


def test_altered_shard_detected_by_checksum(small_store: Path):
    shard = small_store / "validation-00000.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 1  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    TokenStore.open(small_store)  # cheap open checks sizes only
    with pytest.raises(DataError, match=r"validation-00000.bin: sha256 mismatch"):
        TokenStore.open(small_store, verify=True)
    with pytest.raises(DataError, match=r"validation-00000.bin: sha256 mismatch"):
        verify_store(small_store)


def test_manifest_from_another_tokenizer(small_store: Path):
    assert TokenStore.open(small_store, expect_tokenizer="bytes").identity == "bytes"
    with pytest.raises(
        DataError, match=r"manifest.json: store was tokenised with 'bytes', but the run expects 'senten"
    ):
        TokenStore.open(small_store, expect_tokenizer="sentencepiece:abcd")


def test_broken_manifest(small_store: Path, tmp_path: Path):
    with pytest.raises(DataError, match=r"nowhere.*manifest.json: no such folder"):
        TokenStore.open(tmp_path / "nowhere")
    (small_store / MANIFEST).write_text("{not json")
    with pytest.raises(DataError, match="manifest.json: unreadable manifest"):
        TokenStore.open(small_store)
    (small_store / MANIFEST).write_text(json.dumps({"format": "something/else"}))
    with pytest.raises(DataError, match="manifest.json: format 'something/else'"):
        TokenStore.open(small_store)
