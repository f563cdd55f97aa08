"""`reformer-data`: tokenizer -> shard -> verify -> inspect, end to end, and its error exit."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from reformer_dist.cli.data import main
from reformer_dist.data.store import TokenStore


def test_cli_end_to_end(tmp_path: Path, capsys):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("abc.py", "bisect.py", "keyword.py", "colorsys.py"):
        (corpus / "sub" / name).write_bytes((stdlib / name).read_bytes())
    (corpus / "notes.jsonl").write_text(json.dumps({"body": "naïve café 日本語 🙂"}) + "\n", encoding="utf-8")

    assert (
        main(
            [
                "tokenizer",
                "--input",
                str(corpus / "sub"),
                "--vocab-size",
                "400",
                "--model-type",
                "unigram",
                "--out",
                str(tmp_path / "tok"),
                "--num-threads",
                "1",
            ]
        )
        == 0
    )
    identity = capsys.readouterr().out.split()[2]
    assert identity.startswith("sentencepiece:")

    assert (
        main(
            [
                "shard",
                "--input",
                str(corpus / "sub"),
                "--tokenizer",
                str(tmp_path / "tok"),
                "--out",
                str(tmp_path / "store"),
                "--shard-tokens",
                "500",
                "--num-proc",
                "1",
                "--val-fraction",
                "0.25",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "train" in out and "validation" in out and "1 documents" in out
    store = TokenStore.open(tmp_path / "store", expect_tokenizer=identity)
    assert store.num_documents("train") == 3 and store.num_shards("train") > 1

    # a different --text-field for JSON lines; bytes tokenizer
    assert (
        main(
            [
                "shard",
                "--input",
                str(corpus / "notes.jsonl"),
                "--text-field",
                "body",
                "--tokenizer",
                "bytes",
                "--out",
                str(tmp_path / "notes"),
                "--num-proc",
                "1",
            ]
        )
        == 0
    )
    capsys.readouterr()
    notes = TokenStore.open(tmp_path / "notes")
    assert notes.tokenizer.decode(notes.read("train", 0, notes.num_tokens("train"))) == "naïve café 日本語 🙂"

    assert main(["verify", str(tmp_path / "store")]) == 0
    assert capsys.readouterr().out.startswith("OK ")
    assert main(["inspect", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert identity in out and "(ABCs) according to PEP 3119" in out  # abc.py decoded back

    shard = tmp_path / "store" / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[::-1])
    assert main(["verify", str(tmp_path / "store")]) == 1
    assert "train-00000.bin: sha256 mismatch" in capsys.readouterr().err

    # refusing to overwrite is an error with exit status 1, not a traceback
    assert (
        main(
            [
                "shard",
                "--input",
                str(corpus / "sub"),
                "--tokenizer",
                "bytes",
                "--out",
                str(tmp_path / "store"),
                "--num-proc",
                "1",
            ]
        )
        == 1
    )
    assert "already holds a token store" in capsys.readouterr().err


def test_cli_builtin_and_inspect(tmp_path: Path, capsys):
    assert main(["inspect", "builtin", "--tokens", "50"]) == 0
    assert "bytes" in capsys.readouterr().out
    assert main(["builtin", "--out", str(tmp_path / "b")]) == 0
    assert main(["verify", str(tmp_path / "b")]) == 0
