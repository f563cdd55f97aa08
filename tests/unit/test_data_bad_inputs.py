"""Bad-input sweep of `reformer-data` (issues #15, #17), run in-process through `main(argv)`.

Every case asserts: a message naming the file / folder / option and what was expected, a non-zero
exit (2 for usage errors, 1 for data errors), and that nothing complete was lost or left half-written
(the store a case started from is byte-for-byte what it was). docs/troubleshooting.md lists the cases.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from reformer_dist.cli.data import main
from reformer_dist.data.store import TokenStore
from reformer_dist.data.tokenizers import load_tokenizer
from reformer_dist.data.verify import verify_store
from reformer_dist.data.writer import ShardWriter
from reformer_dist.ondisk import STORE_MANIFEST as MANIFEST
from tests.unit.cli_cases import run_cli, snapshot

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def run(capsys, *argv) -> tuple[int, str, str]:
    return run_cli(main, capsys, *argv)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    for name in ("abc.py", "bisect.py", "keyword.py", "colorsys.py"):
        (d / name).write_bytes((STDLIB / name).read_bytes())
    return d


@pytest.fixture
def store(tmp_path: Path, corpus: Path, capsys) -> Path:
    """A complete multi-shard byte-level store with a validation split."""
    out = tmp_path / "store"
    code, _, err = run(
        capsys,
        "shard",
        "--input",
        corpus,
        "--tokenizer",
        "bytes",
        "--out",
        out,
        "--num-proc",
        "1",
        "--shard-tokens",
        "3000",
        "--val-fraction",
        "0.25",
    )
    assert code == 0, err
    assert len(json.loads((out / MANIFEST).read_text())["splits"]["train"]["shards"]) >= 3
    return out


# ---------------------------------------------------------------------------------------- inputs
def test_missing_input(tmp_path, capsys):
    code, _, err = run(
        capsys, "shard", "--input", tmp_path / "nope.txt", "--tokenizer", "bytes", "--out", tmp_path / "s"
    )
    assert code == 1 and f"{tmp_path / 'nope.txt'}: no such file or folder" in err
    assert not (tmp_path / "s" / MANIFEST).exists()


@pytest.mark.parametrize(
    "make, expect",
    [
        (lambda d: (d / "empty.txt").write_text(""), "empty corpus: no non-empty document in {d}/empty.txt"),
        (lambda d: (d / "sub").mkdir(), "{d}/sub: empty corpus: folder holds no files"),
    ],
    ids=["empty-file", "empty-folder"],
)
def test_empty_inputs(tmp_path, capsys, make, expect):
    make(tmp_path)
    target = tmp_path / ("sub" if "folder" in expect else "empty.txt")
    code, _, err = run(
        capsys, "shard", "--input", target, "--tokenizer", "bytes", "--out", tmp_path / "s", "--num-proc", "1"
    )
    assert code == 1 and expect.format(d=tmp_path) in err, err


@pytest.mark.parametrize(
    "name, data, expect",
    [
        ("image.txt", bytes(range(256)) * 4, "cannot read as text"),  # binary file
        ("latin1.txt", "café".encode("latin-1"), "cannot read as text"),  # invalid UTF-8
        ("broken.jsonl", b'{"text": "ok"}\n{"text": "cut', "cannot read as json"),  # malformed JSON line
        ("first.jsonl", b'{"text": oops}\n', "cannot read as json"),  # malformed before the first record
    ],
    ids=["binary", "invalid-utf8", "malformed-jsonl", "malformed-first-record"],
)
def test_unreadable_inputs_name_the_file(tmp_path, capsys, name, data, expect):
    (tmp_path / name).write_bytes(data)
    code, _, err = run(
        capsys, "shard", "--input", tmp_path / name, "--tokenizer", "bytes", "--out", tmp_path / "s", "--num-proc", "1"
    )
    assert code == 1 and f"{tmp_path / name}: {expect}" in err, err
    assert "record -1" not in err
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())


@pytest.mark.parametrize(
    "rows, expect",
    [
        ([{"body": "hello"}], "record 0 has no text field 'text' (fields: ['body']); use --text-field"),
        ([{"text": "fine"}, {"text": 5}], "record 1: field 'text' is int, not text"),
    ],
    ids=["missing-text-field", "text-field-not-a-string"],
)
def test_jsonl_records(tmp_path, capsys, rows, expect):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run(
        capsys,
        "shard",
        "--input",
        tmp_path / "rows.jsonl",
        "--tokenizer",
        "bytes",
        "--out",
        tmp_path / "s",
        "--num-proc",
        "1",
    )
    assert code == 1 and f"{tmp_path / 'rows.jsonl'}: {expect}" in err, err


def test_damaged_last_record_is_named_by_line(tmp_path, capsys):
    # #26: a cut last line was reported "before its first record" (pyarrow parses small files in one block)
    import gzip

    recs = [json.dumps({"text": f"document {i} " * 20}) for i in range(5)]
    (tmp_path / "cut.jsonl").write_text("\n".join(recs) + "\n" + recs[0][:25])
    code, _, err = run(
        capsys,
        "shard",
        "--input",
        tmp_path / "cut.jsonl",
        "--tokenizer",
        "bytes",
        "--out",
        tmp_path / "s",
        "--num-proc",
        "1",
    )
    assert (
        code == 1
        and f"{tmp_path / 'cut.jsonl'}: cannot read as json: line 6 (record 5): not valid JSON (" in err
        and "the file's last line is cut (no newline at its end): a truncated download or copy?" in err
    ), err
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(("\n".join(recs) + "\n").encode())[:-30])
    code, _, err = run(
        capsys,
        "shard",
        "--input",
        tmp_path / "cut.jsonl.gz",
        "--tokenizer",
        "bytes",
        "--out",
        tmp_path / "s",
        "--num-proc",
        "1",
    )
    assert (
        code == 1
        and f"{tmp_path / 'cut.jsonl.gz'}: cannot read as json: the .gz stream ends early (EOFError: " in err
        and "the file is truncated (an interrupted download or copy?)" in err
    ), err
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "option, value, expect",
    [
        ("--shard-tokens", "0", "argument --shard-tokens: expected an integer >= 1, got '0'"),
        ("--shard-tokens", "-5", "argument --shard-tokens: expected an integer >= 1, got '-5'"),
        ("--val-fraction", "1.5", "argument --val-fraction: expected a number in [0, 1), got '1.5'"),
        ("--val-fraction", "-0.1", "argument --val-fraction: expected a number in [0, 1), got '-0.1'"),
        ("--num-proc", "0", "argument --num-proc: expected an integer in 1.."),
        ("--num-proc", "100000", "argument --num-proc: expected an integer in 1.."),
    ],
    ids=[
        "shard-tokens-0",
        "shard-tokens-negative",
        "val-fraction-1.5",
        "val-fraction-negative",
        "num-proc-0",
        "num-proc-unbounded",
    ],
)
def test_bad_numbers_are_usage_errors(tmp_path, capsys, corpus, option, value, expect):
    code, _, err = run(
        capsys, "shard", "--input", corpus, "--tokenizer", "bytes", "--out", tmp_path / "s", option, value
    )
    assert code == 2 and expect in err, err
    assert "Traceback" not in err and not (tmp_path / "s").exists()


@pytest.mark.parametrize("value", ["0", "-3"])
def test_tokenizer_vocab_size_must_be_positive(tmp_path, capsys, corpus, value):
    code, _, err = run(capsys, "tokenizer", "--input", corpus, "--vocab-size", value, "--out", tmp_path / "t")
    assert code == 2 and f"argument --vocab-size: expected an integer >= 1, got '{value}'" in err
    for coverage in ("0", "1.5"):  # #26: reached SentencePiece, which answered in its own terms
        code, _, err = run(
            capsys,
            "tokenizer",
            "--input",
            corpus,
            "--vocab-size",
            "400",
            "--out",
            tmp_path / "t",
            "--character-coverage",
            coverage,
        )
        assert code == 2 and f"argument --character-coverage: expected a number in (0, 1], got '{coverage}'" in err
    assert not (tmp_path / "t").exists()


def test_too_small_vocabulary_says_how_large_it_must_be(tmp_path, capsys, corpus):
    code, _, err = run(
        capsys, "tokenizer", "--input", corpus, "--vocab-size", "100", "--out", tmp_path / "t", "--num-threads", "1"
    )
    assert code == 1, err
    assert "--vocab-size 100 is too small for this corpus" in err and "use --vocab-size >= " in err
    assert "--character_coverage" not in err and "trainer_interface.cc" not in err  # SentencePiece's own spelling
    assert not (tmp_path / "t" / "tokenizer.model").exists()


def test_vocabulary_smaller_than_asked_is_reported(tmp_path, capsys):
    (tmp_path / "tiny.txt").write_text("hello world, hello tokens\n" * 3)
    code, out, err = run(
        capsys,
        "tokenizer",
        "--input",
        tmp_path / "tiny.txt",
        "--vocab-size",
        "400",
        "--out",
        tmp_path / "t",
        "--num-threads",
        "1",
    )
    assert code == 0, err
    got = load_tokenizer(tmp_path / "t").vocab_size
    assert got < 400
    assert f"warning: the tokenizer has {got} pieces, not the 400 asked for" in err


# ---------------------------------------------------------------------------------------- output folder
def test_existing_store_as_out_needs_overwrite(tmp_path, capsys, corpus, store):
    before = snapshot(store)
    code, _, err = run(capsys, "shard", "--input", corpus, "--tokenizer", "bytes", "--out", store, "--num-proc", "1")
    assert code == 1 and f"{store}: already holds a token store" in err and "--overwrite" in err
    assert snapshot(store) == before


def test_failed_overwrite_keeps_the_previous_store(tmp_path, capsys, store):
    # #17: --overwrite with an input that fails used to leave the previous store empty
    before = snapshot(store)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    code, _, err = run(
        capsys,
        "shard",
        "--input",
        tmp_path / "bad.jsonl",
        "--tokenizer",
        "bytes",
        "--out",
        store,
        "--overwrite",
        "--num-proc",
        "1",
    )
    assert code == 1 and "bad.jsonl: record 1 has no text field" in err
    assert snapshot(store) == before
    verify_store(store)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "corpus", "store"]  # no staging left


def test_successful_overwrite_replaces_the_store_and_keeps_foreign_files(tmp_path, capsys, corpus, store):
    (store / "NOTES.txt").write_text("mine")
    code, _, err = run(
        capsys,
        "shard",
        "--input",
        corpus / "abc.py",
        "--tokenizer",
        "bytes",
        "--out",
        store,
        "--overwrite",
        "--num-proc",
        "1",
    )
    assert code == 0, err
    m = verify_store(store)
    assert m["splits"]["train"]["num_documents"] == 1 and len(m["splits"]["train"]["shards"]) == 1
    assert sorted(p.name for p in store.iterdir()) == ["NOTES.txt", MANIFEST, "train-00000.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "store"]


@pytest.mark.parametrize("where", ["inside", "same"])
def test_out_inside_input_is_refused(tmp_path, capsys, corpus, where):
    out = corpus / "store" if where == "inside" else corpus
    before = snapshot(corpus)
    code, _, err = run(capsys, "shard", "--input", corpus, "--tokenizer", "bytes", "--out", out, "--num-proc", "1")
    rel = "is inside" if where == "inside" else "is"
    assert code == 2 and f"--out {out} {rel} the input folder {corpus}" in err, err
    assert snapshot(corpus) == before and not (corpus / "store").exists()


def test_second_write_into_the_same_out_is_refused(tmp_path, capsys, corpus):
    # #26: two `shard` into one new --out both printed "wrote"; the last writer won
    out = tmp_path / "store"
    first = ShardWriter(out, load_tokenizer("bytes"), 1000)  # a shard into `out` still running
    first.add("train", np.arange(100, dtype=np.uint16) % 256)
    code, _, err = run(capsys, "shard", "--input", corpus, "--tokenizer", "bytes", "--out", out, "--num-proc", "1")
    assert code == 2 and f"{out}: --out is in use by another reformer-data write (pid {os.getpid()}" in err, err
    assert "choose another --out; nothing in the folder was touched" in err
    assert not out.exists()
    first.close()  # the first write completes untouched
    verify_store(out)
    assert TokenStore.open(out).num_tokens("train") == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "store"]  # lock released, no staging left
    code, _, err = run(
        capsys, "shard", "--input", corpus, "--tokenizer", "bytes", "--out", tmp_path / "s2", "--num-proc", "1"
    )
    assert code == 0, err


def test_tokenizer_out_holding_a_tokenizer_or_a_store_is_refused(tmp_path, capsys, corpus, store):
    # #26: `tokenizer --out` replaced an existing tokenizer without --overwrite; in a store it broke `verify`
    args = ["tokenizer", "--input", corpus, "--vocab-size", "400", "--num-threads", "1"]
    assert run(capsys, *args, "--out", tmp_path / "tok")[0] == 0
    before = snapshot(tmp_path / "tok")
    code, _, err = run(capsys, *args, "--out", tmp_path / "tok", "--model-type", "unigram")
    assert (
        code == 2 and f"--out {tmp_path / 'tok'} already holds a tokenizer (tokenizer.model); pass --overwrite" in err
    )
    assert snapshot(tmp_path / "tok") == before
    assert run(capsys, *args, "--out", tmp_path / "tok", "--model-type", "unigram", "--overwrite")[0] == 0
    assert snapshot(tmp_path / "tok") != before

    before = snapshot(store)
    for extra in ([], ["--overwrite"]):
        code, _, err = run(capsys, *args, "--out", store, *extra)
        assert (
            code == 2
            and f"--out {store} holds a token store (manifest.json); a tokenizer written there would "
            "replace the store's own tokenizer.model and break its tokenizer identity"
            in err
        ), err
    assert snapshot(store) == before
    verify_store(store)


def test_store_without_validation_split_is_announced(tmp_path, capsys, corpus):
    code, _, err = run(
        capsys, "shard", "--input", corpus, "--tokenizer", "bytes", "--out", tmp_path / "s", "--num-proc", "1"
    )
    assert code == 0
    assert "warning: the store has no validation split" in err and "--val-fraction" in err
    assert "--set eval.every=0 --set eval.at_end=false" in err


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["umask-022", "umask-002"])
def test_store_modes_follow_the_umask(tmp_path, capsys, corpus, umask):
    old = os.umask(umask)
    try:
        code, _, err = run(
            capsys, "shard", "--input", corpus, "--tokenizer", "bytes", "--out", tmp_path / "s", "--num-proc", "1"
        )
    finally:
        os.umask(old)
    assert code == 0, err
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o777 & ~umask
    for p in (tmp_path / "s").iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p


# ---------------------------------------------------------------------------------------- damaged stores
def test_edited_manifest_is_caught(capsys, store):
    m = json.loads((store / MANIFEST).read_text())
    m["splits"]["train"]["shards"][0]["num_tokens"] += 10
    (store / MANIFEST).write_text(json.dumps(m))
    for cmd in ("verify", "inspect"):
        code, _, err = run(capsys, cmd, store)
        assert code == 1 and f"{store / 'train-00000.bin'}: shard is 6000 bytes, manifest says 6020" in err, err


@pytest.mark.parametrize(
    "field, value, says",
    [
        (
            ("splits", "train", "shards", 0, "num_tokens"),
            "3000",
            "splits.train.shards[0].num_tokens: expected an integer >= 0, got '3000'",
        ),
        (
            ("splits", "train", "shards", 1, "num_tokens"),
            -5,
            "splits.train.shards[1].num_tokens: expected an integer >= 0, got -5",
        ),
        (
            ("splits", "train", "shards", 0, "file"),
            "../corpus/abc.py",
            "splits.train.shards[0].file: expected a file name inside the store",
        ),
        (
            ("splits", "train", "shards", 0, "sha256"),
            "xyz",
            "splits.train.shards[0].sha256: expected 64 lowercase hex digits",
        ),
        (
            ("splits", "validation", "num_documents"),
            1.5,
            "splits.validation.num_documents: expected an integer >= 0, got 1.5",
        ),
        (("eod_id",), 300, "eod_id: expected an integer in [0, vocab_size=257), got 300"),
        (("vocab_size",), True, "vocab_size: expected an integer >= 1, got True"),
        (("tokenizer", "identity"), 5, "tokenizer.identity: expected the tokenizer's identity string, got 5"),
    ],
    ids=[
        "count-as-text",
        "negative-count",
        "file-outside",
        "bad-sha",
        "float-count",
        "eod-out-of-range",
        "bool-vocab",
        "identity-not-text",
    ],
)
def test_manifest_fields_of_the_wrong_type_or_range_are_named(capsys, store, field, value, says):
    # #26: such fields were read silently (a string count, a negative size, a shard file outside the store)
    m = json.loads((store / MANIFEST).read_text())
    target = m
    for key in field[:-1]:
        target = target[key]
    target[field[-1]] = value
    (store / MANIFEST).write_text(json.dumps(m))
    before = snapshot(store)
    for cmd in ("verify", "inspect"):
        code, _, err = run(capsys, cmd, store)
        assert code == 1 and f"{store / MANIFEST}: {says}" in err, err
    assert snapshot(store) == before


def test_truncated_shard_verify_names_it_without_sending_you_to_verify(capsys, store):
    shard = store / "train-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    code, _, err = run(capsys, "verify", store)
    assert code == 1 and f"{shard}: shard is 5998 bytes, manifest says 6000" in err
    assert "run `reformer-data verify`" not in err
    code, _, err = run(capsys, "inspect", store)  # elsewhere the hint is useful
    assert code == 1 and "run `reformer-data verify" in err


def test_shard_with_out_of_range_tokens_fails_verify(tmp_path, capsys):
    with ShardWriter(tmp_path / "s", load_tokenizer("bytes"), shard_tokens=100) as w:
        w.add("train", np.arange(100) % 256)
    shard = tmp_path / "s" / "train-00000.bin"
    data = np.fromfile(shard, dtype=np.uint16)
    data[7] = 60000  # same size, edited content; the manifest sha256 is recomputed to hide it
    data.tofile(shard)
    m = json.loads((tmp_path / "s" / MANIFEST).read_text())
    m["splits"]["train"]["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(m))
    code, _, err = run(capsys, "verify", tmp_path / "s")
    assert code == 1 and f"{shard}: token id 60000 >= vocab_size 257" in err


def test_missing_tokenizer_folder(tmp_path, capsys, corpus):
    code, _, err = run(capsys, "shard", "--input", corpus, "--tokenizer", tmp_path / "tok", "--out", tmp_path / "s")
    assert code == 1 and f"{tmp_path / 'tok'}: no tokenizer here" in err
    assert not (tmp_path / "s").exists()


def _processes_naming(text: str) -> set[int]:
    """Live (not zombie) processes whose command line contains `text`: forked workers keep their parent's."""
    found = set()
    for d in Path("/proc").iterdir():
        try:
            if (
                d.name.isdigit()
                and text in (d / "cmdline").read_bytes().decode(errors="replace")
                and (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            ):
                found.add(int(d.name))
        except OSError:
            pass
    return found


@pytest.mark.slow
def test_killed_shard_leaves_no_worker_process(tmp_path):
    # #26: a SIGKILLed `shard --num-proc 2` left its workers blocked on a pipe, holding memory, for good
    corpus = tmp_path / "big"
    corpus.mkdir()
    text = (STDLIB / "argparse.py").read_text()
    for i in range(60):
        (corpus / f"f{i}.txt").write_text(text * 4)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "reformer_dist.cli.data",
            "shard",
            "--input",
            str(corpus),
            "--tokenizer",
            "bytes",
            "--out",
            str(tmp_path / "store"),
            "--num-proc",
            "2",
            "--shard-tokens",
            "100000",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    mine = str(corpus)  # in the command line of the shard process and of every worker it forks
    err, workers = b"", set()
    deadline = time.monotonic() + 300
    os.set_blocking(proc.stderr.fileno(), False)
    # the tokenising pool (`map`, its progress bar says "tokenise") is what used to hang
    while (b"tokenise" not in err or len(workers) < 2) and proc.poll() is None and time.monotonic() < deadline:
        err += proc.stderr.read() or b""
        workers = _processes_naming(mine) - {proc.pid}
        time.sleep(0.02)
    assert len(workers) >= 2 and b"tokenise" in err, f"no tokenising workers seen (exit {proc.poll()}): {err[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 60  # they notice within a moment; a ceiling for a loaded machine
    while _processes_naming(mine) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _processes_naming(mine)
    for p in left:  # do not leave them behind
        os.kill(p, signal.SIGKILL)
    assert not left, f"processes outlived the killed shard: {left} (workers seen: {sorted(workers)})"
    assert not (tmp_path / "store" / MANIFEST).exists()
