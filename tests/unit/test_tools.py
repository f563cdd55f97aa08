"""The standalone scripts of tools/: what they share with the package, and the corpus scripts on tiny
synthetic downloads (no network)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from reformer_dist import ondisk
from reformer_dist.data.store import TokenStore
from reformer_dist.data.tokenizers import ByteTokenizer
from tests.helpers import TOOLS, load_tool


def test_zero_to_safetensors_reads_and_writes_the_packages_file_names():
    # the script cannot import reformer_dist.ondisk, so it spells the names itself: they must not drift
    tool = load_tool("zero_to_safetensors")
    assert (tool.LATEST, tool.RUN_CONFIG, tool.CONFIG_NAME, tool.WEIGHTS_NAME) == (
        ondisk.LATEST,
        ondisk.RUN_CONFIG,
        ondisk.CONFIG_NAME,
        ondisk.WEIGHTS_NAME,
    )
    assert TOOLS / ondisk.ZERO_TO_SAFETENSORS == Path(tool.__file__)


def run_tool(name: str, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """A tools/ script run as a file, the way its --help says (this checkout's package on PYTHONPATH)."""
    env = {**os.environ, "PYTHONPATH": str(TOOLS.parent)}
    return subprocess.run(
        [sys.executable, str(TOOLS / f"{name}.py"), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def read_split(store: TokenStore, split: str) -> np.ndarray:
    return store.read(split, 0, store.num_tokens(split))


@pytest.mark.parametrize("name", ["prepare_enwik8", "prepare_pg19"])
@pytest.mark.slow
def test_corpus_scripts_say_they_need_the_package(tmp_path, name):
    p = run_tool(name, "--help", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "needs reformer_dist" in " ".join(p.stdout.split())


@pytest.mark.slow
def test_enwik8_split_90_5_5_scaled_bytes_unchanged(tmp_path):
    # enwik8's format: raw bytes (any value, not necessarily whole UTF-8 characters), 1000 here for 100M
    data = np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    (tmp_path / "enwik8").write_bytes(data)
    p = run_tool("prepare_enwik8", "enwik8", "--out", "store", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "not the 100,000,000-byte enwik8" in p.stderr
    store = TokenStore.open(tmp_path / "store", expect_tokenizer="bytes")
    eod = [ByteTokenizer.eod_id]
    assert read_split(store, "train").tolist() == list(data[:900]) + eod
    assert read_split(store, "validation").tolist() == list(data[900:950]) + eod

    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w") as z:  # the download is a zip holding `enwik8`
        z.writestr("enwik8", data)
    p = run_tool(
        "prepare_enwik8",
        "enwik8.zip",
        "--out",
        "test_store",
        "--validation",
        "test",
        "--shard-tokens",
        "256",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    store = TokenStore.open(tmp_path / "test_store")
    assert read_split(store, "train").tolist() == list(data[:900]) + eod and store.num_shards("train") == 4
    assert read_split(store, "validation").tolist() == list(data[950:]) + eod

    p = run_tool("prepare_enwik8", "missing", "--out", "x", cwd=tmp_path)
    assert p.returncode == 1 and "missing: no such file" in p.stderr


def test_pg19_books_are_documents(tmp_path, capsys):
    # PG-19's format: train/, validation/, test/ folders of <id>.txt books
    books = {
        "train": {"10.txt": "The first book.\n\nIt has two paragraphs.", "11.txt": "Second — with ümlauts."},
        "validation": {"20.txt": "A held-out book."},
        "test": {"30.txt": "The test book."},
    }
    for part, files in books.items():
        (tmp_path / "pg19" / part).mkdir(parents=True)
        for name, text in files.items():
            (tmp_path / "pg19" / part / name).write_text(text, encoding="utf-8")
    tool = load_tool("prepare_pg19")
    assert tool.main([str(tmp_path / "pg19"), "--out", str(tmp_path / "store")]) == 0
    store = TokenStore.open(tmp_path / "store", expect_tokenizer="bytes")
    assert store.num_documents("train") == 2 and store.num_documents("validation") == 1
    tok = ByteTokenizer()
    assert read_split(store, "train").tolist() == (
        tok.encode(books["train"]["10.txt"]) + [tok.eod_id] + tok.encode(books["train"]["11.txt"]) + [tok.eod_id]
    )
    assert store.tokenizer.decode(read_split(store, "validation")) == "A held-out book."

    assert tool.main([str(tmp_path / "pg19"), "--out", str(tmp_path / "test_store"), "--validation", "test"]) == 0
    validation = read_split(TokenStore.open(tmp_path / "test_store"), "validation")
    assert store.tokenizer.decode(validation) == "The test book."

    shutil.rmtree(tmp_path / "pg19" / "validation")
    capsys.readouterr()
    assert tool.main([str(tmp_path / "pg19"), "--out", str(tmp_path / "x")]) == 1
    assert f"{tmp_path / 'pg19' / 'validation'}: no such folder" in capsys.readouterr().err
