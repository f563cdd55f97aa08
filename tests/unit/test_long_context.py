"""reformer-eval / reformer-generate / reformer-data synth (issue 22): parity with the trainer's evaluation,
loss by position, synthetic stores, exact task scoring, generation end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reformer_dist.cli import eval as eval_cli, plot as plot_cli
from reformer_dist.data.builtin import builtin_corpus
from reformer_dist.data.model_data import read_record, record_files
from reformer_dist.data.store import TokenStore
from reformer_dist.data.synthetic import SynthSpec, needle_start, passkey_fixed_len, task_layout, write_synthetic
from reformer_dist.data.tokenizers import ByteTokenizer, Tokenizer
from reformer_dist.data.writer import ShardWriter
from reformer_dist.evaluate.generate import safe_text
from reformer_dist.evaluate.lm import evaluate_lm, plan_windows, position_bins
from reformer_dist.evaluate.loading import LoadedModel, load_model
from reformer_dist.evaluate.tasks import answer_labels, evaluate_task, score_answers
from reformer_dist.model.config import ReformerConfig
from reformer_dist.model.reformer import ReformerLM
from tests.unit.cli_cases import run_cli

REPO = Path(__file__).resolve().parents[2]
SEQ, WINDOWS = 128, 3


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of reformer-train (2 steps, document masking) on a store whose validation split is exactly
    WINDOWS windows: the trainer's evaluation then reads every window of it, as reformer-eval does."""
    root = tmp_path_factory.mktemp("run")
    arrays, _ = builtin_corpus()
    with ShardWriter(root / "store", ByteTokenizer(), 1 << 20) as w:
        w.add("train", arrays["train"][:50_000])
        # short documents: every window holds document boundaries, so the masks matter
        val = arrays["validation"][arrays["validation"] != 256][: WINDOWS * SEQ]
        docs = np.insert(val, np.arange(90, val.size, 90), 256)
        w.add("validation", docs[: WINDOWS * SEQ + 1])
    sets = [
        "model.d_model=32",
        "model.d_head=16",
        "model.d_ff=64",
        "model.chunk_len=16",
        "model.n_hashes=2",
        f"data.path={root / 'store'}",
        f"data.seq_len={SEQ}",
        "data.document_masking=true",
        "data.reset_positions=true",
        "train.micro_batch=1",
        "train.max_steps=2",
        "train.warmup_steps=1",
        "eval.every=0",
        f"eval.batches={WINDOWS}",
        "checkpoint.at_end=true",
        "output.sample_tokens=0",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        f"output.dir={root / 'run'}",
    ]
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "reformer_dist.cli.train",
            "--config",
            str(REPO / "configs/quickstart.toml"),
            *[a for s in sets for a in ("--set", s)],
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return root


def tiny_model(
    folder: Path, record: bool = True, tokenizer: Tokenizer | None = None, data: dict | None = None, **kw
) -> Path:
    """A random model saved as the trainer saves one: with the record of its data (bytes on the built-in
    corpus unless ``tokenizer``/``data`` say otherwise) in the same checksummed write, or none."""
    torch.manual_seed(0)
    cfg = dict(
        vocab_size=257,
        d_model=32,
        n_heads=2,
        d_head=16,
        d_ff=64,
        n_layers=2,
        attn_layers=["local", "lsh"],
        chunk_len=16,
        axial_pos_shape=[16, 32],
    )
    cfg.update(kw)
    tok, used = tokenizer or ByteTokenizer(), data or {"path": "builtin", "seq_len": 128}
    files = record_files(tok, used, cfg["vocab_size"]) if record else None
    ReformerLM(ReformerConfig(**cfg)).save_pretrained(folder, extra_files=files)
    return folder


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.slow
def test_eval_loss_equals_the_trainers_evaluation(trained, tmp_path, capsys):
    end = [json.loads(line) for line in (trained / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert end["event"] == "end"
    out = tmp_path / "e.json"
    code, stdout, err = run_cli(
        eval_cli.main,
        capsys,
        trained / "run" / "model",
        "--data",
        trained / "store",
        "--seq-len",
        SEQ,
        "--out",
        out,
        "--no-progress",
        "--no-plot",
    )
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["windows"] == WINDOWS and res["rows"][0]["tokens"] == WINDOWS * SEQ
    assert res["document_masking"] is True  # read from the model's training_data.json
    assert abs(res["rows"][0]["loss"] - end["eval_loss"]) < 1e-6, (res["rows"][0]["loss"], end["eval_loss"])
    rec = json.loads((trained / "run" / "model" / "training_data.json").read_text())
    assert rec["tokenizer"] == "bytes" and rec["document_masking"] and rec["reset_positions"]
    # written with the weights, in their checksums (a damaged record is caught like damaged weights)
    assert "training_data.json" in json.loads((trained / "run" / "model" / "checksums.json").read_text())["files"]
    # without the document masks the trainer used, the number differs: the check above is not vacuous
    loaded = load_model(trained / "run" / "model")
    loaded.record = {**loaded.record, "document_masking": False, "reset_positions": False}
    other = evaluate_lm(loaded, TokenStore.open(trained / "store"), "validation", SEQ, progress=False)
    assert abs(other["rows"][0]["loss"] - end["eval_loss"]) > 1e-4


@pytest.mark.slow
def test_eval_of_a_checkpoint_root_equals_its_weights_folder(trained, tmp_path, capsys):
    """A checkpoint root is reassembled in memory (as consolidate does); its data record comes from run_config.json."""
    losses = []
    for model in (trained / "run" / "model", trained / "run" / "checkpoints"):
        out = tmp_path / f"{model.name}.json"
        code, _, err = run_cli(
            eval_cli.main,
            capsys,
            model,
            "--data",
            trained / "store",
            "--seq-len",
            SEQ,
            "--out",
            out,
            "--no-progress",
            "--no-plot",
        )
        assert code == 0, err
        res = json.loads(out.read_text())
        assert res["document_masking"] is True
        losses.append(res["rows"][0]["loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    # a consolidated folder carries its own training_data.json (from the checkpoint's run_config.json), in its
    # checksums: it still decodes and refuses other stores after the checkpoint is deleted or it is moved
    from reformer_dist.checkpoint.consolidate import consolidate

    summary = consolidate(trained / "run" / "checkpoints", tmp_path / "final")
    assert summary["tokenizer"] == "bytes" and "tokenizer_note" not in summary
    rec = load_model(tmp_path / "final").record
    assert rec["tokenizer"] == "bytes" and rec["document_masking"] and rec["_where"].endswith("training_data.json")
    assert "training_data.json" in json.loads((tmp_path / "final" / "checksums.json").read_text())["files"]
    assert (
        rec["reset_positions"]
        == json.loads((trained / "run" / "model" / "training_data.json").read_text())["reset_positions"]
    )


@pytest.mark.slow
def test_generate_end_to_end_from_a_trained_model(trained):
    model_dir = trained / "run" / "model"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "reformer_dist.cli.generate",
            str(model_dir),
            "--prompt",
            "def ",
            "--max-new-tokens",
            "24",
            "--temperature",
            "0",
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "tokens/s" in p.stderr and "24 tokens after a 4-token prompt" in p.stderr
    # the same greedy continuation as the model's own cached generate, decoded with bytes and made safe
    m = ReformerLM.from_pretrained(model_dir).eval()
    ids = m.generate(torch.tensor([list(b"def ")]), 24, temperature=0)
    want = safe_text(ByteTokenizer().decode(ids[0, 4:].tolist()))
    assert p.stdout == want + "\n"
    assert not any(ord(c) < 32 and c not in "\n\t" for c in p.stdout)


def test_safe_text_escapes_control_characters():
    assert safe_text("a\x1b[2Jb\tc\n\x7f\u202e\x85é") == "a\\x1b[2Jb\tc\n\\x7f\\u202e\\x85é"


# ---------------------------------------------------------------------------------------------- loss by position
def test_position_bins_and_window_plan():
    assert position_bins(1) == [(1, 1)]
    assert position_bins(10) == [(1, 1), (2, 3), (4, 7), (8, 10)]
    assert position_bins(16) == [(1, 1), (2, 3), (4, 7), (8, 15), (16, 16)]
    plan = plan_windows(1000, 100, stride=40)
    assert plan.starts[:3] == [0, 40, 80] and plan.starts[-1] + 101 <= 1000 < plan.starts[-1] + 40 + 101
    assert plan.scored_from == [0] + [60] * (len(plan.starts) - 1)
    assert plan.tokens == 100 + 40 * (len(plan.starts) - 1)
    # the budget stops at whole windows: at least one, never over
    assert plan_windows(1000, 100, max_tokens=250).starts == [0, 100]
    assert plan_windows(1000, 100, max_tokens=5).starts == [0]


def test_bins_weighted_by_counts_give_the_total(tmp_path):
    loaded = load_model(tiny_model(tmp_path / "m"))
    res = evaluate_lm(
        loaded, TokenStore.open("builtin"), "validation", 96, stride=40, rounds=[1, 2], max_tokens=600, progress=False
    )
    for row in res["rows"]:
        bins = row["by_position"]
        assert sum(b["tokens"] for b in bins) == row["tokens"] == 96 + 40 * (res["windows"] - 1)
        total = sum(b["loss"] * b["tokens"] for b in bins if b["tokens"]) / row["tokens"]
        assert total == pytest.approx(row["loss"], abs=1e-9)
        assert row["bits_per_byte"] == pytest.approx(row["loss"] / math.log(2))
        assert row["perplexity"] == pytest.approx(math.exp(row["loss"]))
        # after the first window only the last 40 labels count: positions 57..96
        later = res["windows"] - 1
        assert [(b["lo"], b["hi"], b["tokens"]) for b in bins] == [
            (1, 1, 1),
            (2, 3, 2),
            (4, 7, 4),
            (8, 15, 8),
            (16, 31, 16),
            (32, 63, 32 + 7 * later),
            (64, 96, 33 * (later + 1)),
        ]
    assert res["rows"][0]["loss"] != res["rows"][1]["loss"]  # another round count, another number


def test_plot_overlays_several_results(tmp_path, capsys):
    loaded = load_model(tiny_model(tmp_path / "m"))
    store = TokenStore.open("builtin")
    files = []
    for name, rounds in (("a", [1]), ("b", [2, "full"])):
        res = evaluate_lm(loaded, store, "validation", 64, rounds=rounds, max_tokens=64, progress=False)
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(res))
    code, out, err = run_cli(plot_cli.main, capsys, *files, "--out", tmp_path / "p.png")
    assert code == 0, err
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, err = run_cli(plot_cli.main, capsys, files[0], tmp_path, "--out", tmp_path / "q.png")
    assert code == 2 and "runs and eval results do not mix" in err


# ---------------------------------------------------------------------------------------------- synthetic stores
@pytest.mark.parametrize("task", ["duplication", "passkey"])
def test_synthetic_stores_are_deterministic_by_seed(tmp_path, task):
    def make(name, seed):
        spec = SynthSpec(task, [128, 256], examples=3, train_examples=5, seed=seed, n_symbols=16)
        write_synthetic(spec, tmp_path / name)
        m = json.loads((tmp_path / name / "manifest.json").read_text())
        return [s["sha256"] for split in ("train", "validation") for s in m["splits"][split]["shards"]]

    a, b, c = make("a", 1), make("b", 1), make("c", 2)
    assert a == b and len(a) == 2
    assert a[0] != c[0] and a[1] != c[1]


def test_synthetic_documents_have_the_documented_layout(tmp_path):
    write_synthetic(SynthSpec("duplication", [10, 20], examples=4, n_symbols=5), tmp_path / "d")
    store = TokenStore.open(tmp_path / "d")
    meta = store.manifest["metadata"]["synthetic"]
    assert store.identity == "symbols:7" and store.eod_id == 6
    for cell in task_layout(meta):
        for s in cell.starts:
            doc = store.read("validation", s, cell.length + 1)
            n = cell.length // 2 - 1
            assert doc[0] == 0 and doc[n + 1] == 0 and doc[-1] == 6
            assert (doc[1 : n + 1] == doc[n + 2 : cell.length]).all() and doc[1 : n + 1].min() >= 1
            assert doc[1 : n + 1].max() <= 5 and cell.answer == (n + 2, cell.length)
    write_synthetic(SynthSpec("passkey", [300], examples=2, depths=(0.0, 0.5, 1.0), key_digits=4), tmp_path / "p")
    store = TokenStore.open(tmp_path / "p")
    # by hand: needle + question take 99 bytes (asserted below), so 201 bytes of filler; the needle starts
    # depth x 201 bytes in: 0, 100 (100.5 rounds to even) and 201 (right before the question)
    needle_at = {0.0: 0, 0.5: 100, 1.0: 201}
    depths = []
    for cell in task_layout(store.manifest["metadata"]["synthetic"]):
        depths.append(cell.depth)
        for s in cell.starts:
            text = bytes(store.read("validation", s, cell.length).astype(np.uint8)).decode()
            key = text[-4:]
            at = needle_at[cell.depth]
            assert needle_start(300, cell.depth, 4) == at
            assert key.isdigit()
            assert text[at:].startswith(f"The pass key is {key}. Remember it. {key} is the pass key. ")
            assert "pass key" not in text[:at]  # filler before the needle
            assert text.endswith(f"What is the pass key? The pass key is {key}") and len(text) == 300
    assert sorted(depths) == [0.0, 0.5, 1.0]
    assert passkey_fixed_len(4) == len(
        "The pass key is 0000. Remember it. 0000 is the pass key. What is the pass key? The pass key is 0000"
    )


# ---------------------------------------------------------------------------------------------- task scoring
def test_task_scoring_is_exact_on_hand_made_sequences():
    docs = np.array([[0, 3, 4, 0, 3, 4, 9], [0, 1, 2, 0, 1, 2, 9]])
    ids, labels = answer_labels(docs, (4, 6))
    assert ids.tolist() == [[0, 3, 4, 0, 3, 4], [0, 1, 2, 0, 1, 2]]
    assert labels.tolist() == [[-100, -100, -100, 3, 4, -100], [-100, -100, -100, 1, 2, -100]]
    preds = torch.tensor([[7, 7, 7, 3, 4, 7], [7, 7, 7, 1, 5, 7]])
    assert score_answers(preds, labels) == (3, 4, 1)


class _Copier(torch.nn.Module):
    """Predicts token t as token t - (L/2) (a perfect duplication solver) for examples whose first copied
    symbol is odd, and always 0 for the others: its exact accuracy is known from the store alone."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def forward(self, ids, labels, reduction, **_):
        half = ids.shape[1] // 2
        preds = torch.zeros_like(ids)
        preds[:, half - 1 : -1] = ids[:, : ids.shape[1] - half]  # input i predicts token i + 1 = token i + 1 - half
        preds[ids[:, 1] % 2 == 0] = 0
        return torch.zeros(ids.shape, dtype=torch.float32), preds


def test_task_evaluation_counts_answers_exactly(tmp_path):
    write_synthetic(SynthSpec("duplication", [8, 12], examples=6, n_symbols=9, seed=3), tmp_path / "d")
    store = TokenStore.open(tmp_path / "d")
    cfg = ReformerConfig(vocab_size=11, d_model=8, n_heads=1, d_head=8, d_ff=8, axial_pos_shape=[4, 4])
    loaded = LoadedModel(_Copier(cfg), "copier", None)
    res = evaluate_task(loaded, store, batch_size=4, progress=False)
    for cell in res["rows"][0]["cells"]:
        (c,) = [c for c in task_layout(store.manifest["metadata"]["synthetic"]) if c.length == cell["length"]]
        odd = [int(store.read("validation", s + 1, 1)[0]) % 2 == 1 for s in c.starts]
        assert cell["exact"] == pytest.approx(sum(odd) / len(odd))
        assert cell["accuracy"] == pytest.approx(sum(odd) / len(odd))  # every symbol of a copied example is right
    assert res["chance"] == pytest.approx(1 / 9)


# ---------------------------------------------------------------------------------------------- bad input
def _eval(capsys, *argv):
    return run_cli(eval_cli.main, capsys, *argv, "--no-progress")


def test_eval_refuses_a_store_of_another_tokenizer(tmp_path, capsys):
    write_synthetic(SynthSpec("duplication", [64], examples=2, n_symbols=9), tmp_path / "d")
    code, _, err = _eval(
        capsys, tiny_model(tmp_path / "m"), "--data", tmp_path / "d", "--seq-len", 32, "--out", tmp_path / "e.json"
    )
    assert code == 1 and "tokenised with symbols:11, but the model" in err and "trained with bytes" in err, err
    assert str(tmp_path / "d" / "manifest.json") in err and not (tmp_path / "e.json").exists()


def test_eval_refuses_a_store_whose_ids_do_not_fit_an_unrecorded_model(tmp_path, capsys):
    write_synthetic(SynthSpec("duplication", [64], examples=2, n_symbols=300), tmp_path / "d")
    code, _, err = _eval(
        capsys,
        tiny_model(tmp_path / "m", record=False),
        "--data",
        tmp_path / "d",
        "--seq-len",
        32,
        "--out",
        tmp_path / "e.json",
    )
    assert code == 1 and "vocabulary of 302 ids, but the model" in err and "vocab_size 257" in err, err


def test_eval_refuses_a_split_too_short_for_one_window(tmp_path, capsys):
    write_synthetic(SynthSpec("duplication", [16], examples=2, n_symbols=9), tmp_path / "d")
    m = tiny_model(tmp_path / "m", vocab_size=11, record=False)
    code, _, err = _eval(capsys, m, "--data", tmp_path / "d", "--seq-len", 64, "--out", tmp_path / "e.json")
    assert code == 1 and "'validation'" in err and "34 tokens; a window of --seq-len 64 needs 65" in err, err


def test_eval_refuses_a_length_the_model_cannot_take(tmp_path, capsys):
    code, _, err = _eval(
        capsys, tiny_model(tmp_path / "m"), "--data", "builtin", "--seq-len", 1024, "--out", tmp_path / "e.json"
    )
    assert code == 1 and "--seq-len 1024" in err and "covers 512 positions (axial_pos_shape [16, 32])" in err, err


def test_eval_refuses_hash_rounds_without_lsh_layers(tmp_path, capsys):
    m = tiny_model(tmp_path / "m", attn_layers=["local", "local"])
    code, _, err = _eval(capsys, m, "--data", "builtin", "--seq-len", 64, "--n-hashes", "1,2")
    assert code == 1 and "has no LSH layers" in err, err
    code, _, err = _eval(capsys, tiny_model(tmp_path / "n"), "--data", "builtin", "--seq-len", 64, "--n-hashes", "0")
    assert code == 1 and "--n-hashes: expected hash-round counts >= 1" in err, err


def test_eval_refuses_what_is_not_a_model(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = _eval(capsys, tmp_path / "empty", "--data", "builtin", "--seq-len", 64)
    assert code == 1 and str(tmp_path / "empty") in err and "weights folder" in err, err
    code, _, err = _eval(capsys, tmp_path / "nothing", "--data", "builtin", "--seq-len", 64)
    assert code == 1 and "no such folder" in err, err


def test_eval_task_refuses_a_store_that_is_not_synthetic(tmp_path, capsys):
    code, _, err = _eval(capsys, tiny_model(tmp_path / "m"), "--data", "builtin", "--task")
    assert code == 1 and "not a synthetic task store" in err, err


def test_generate_refuses_what_it_cannot_decode_or_fit(tmp_path, capsys):
    from reformer_dist.cli import generate as gen_cli

    def gen(*argv):
        return run_cli(gen_cli.main, capsys, *argv, "--max-new-tokens", 2)

    code, out, err = gen(tiny_model(tmp_path / "m", record=False), "--prompt", "x")
    assert code == 1 and "does not record its tokenizer" in err and "--tokenizer" in err and out == "", err
    r = tiny_model(tmp_path / "r")
    assert read_record(r)["tokenizer"] == "bytes"
    code, out, err = gen(r, "--prompt", "x", "--tokenizer", "symbols:11")
    assert code == 1 and "is symbols:11, but" in err and "was trained with bytes" in err, err
    code, out, err = gen(r, "--prompt", "x" * 600)
    assert code == 1 and "more than the model's 512" in err, err
    code, out, err = gen(r, "--prompt-file", tmp_path / "missing.txt")
    assert code == 1 and "missing.txt: cannot read the prompt" in err, err
    code, out, err = gen(r, "--prompt", "x", "--temperature", "0")
    assert code == 0 and "tokens/s" in err, err


def test_eval_task_cli_writes_the_table_json_and_heat_map(tmp_path, capsys):
    from reformer_dist.data.tokenizers import SymbolTokenizer

    write_synthetic(SynthSpec("duplication", [16, 32], examples=3, n_symbols=9), tmp_path / "d")
    m = tiny_model(tmp_path / "m", vocab_size=11, tokenizer=SymbolTokenizer(11), data={"path": str(tmp_path / "d")})
    code, out, err = _eval(
        capsys, m, "--data", tmp_path / "d", "--task", "--n-hashes", "1,8,full", "--out", tmp_path / "t.json"
    )
    assert code == 0, err
    res = json.loads((tmp_path / "t.json").read_text())
    assert res["format"] == "reformer_dist.task_eval/1" and [r["n_hashes"] for r in res["rows"]] == [1, 8, "full"]
    assert [(c["length"], c["examples"], c["answer_tokens"]) for c in res["rows"][0]["cells"]] == [
        (16, 3, 21),
        (32, 3, 45),
    ]
    assert "duplication:" in out and "n_hashes full: accuracy" in out
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_data_synth_cli_writes_a_store_and_names_bad_options(tmp_path, capsys):
    from reformer_dist.cli import data as data_cli

    code, out, err = run_cli(
        data_cli.main,
        capsys,
        "synth",
        "--task",
        "duplication",
        "--lengths",
        "8",
        "--symbols",
        "5",
        "--examples",
        "1",
        "--out",
        tmp_path / "d",
    )
    assert code == 0 and "symbols:7" in out, err
    code, out, err = run_cli(data_cli.main, capsys, "inspect", tmp_path / "d")
    assert code == 0 and "\n0 " in out and " 0 " in out  # symbols decoded as numbers, not raw bytes
    code, out, err = run_cli(
        data_cli.main, capsys, "synth", "--task", "duplication", "--lengths", "9", "--out", tmp_path / "e"
    )
    assert code == 2 and "--lengths [9]: duplication documents are 0 w 0 w, an even length >= 4" in err
    code, out, err = run_cli(
        data_cli.main, capsys, "synth", "--task", "passkey", "--lengths", "50", "--out", tmp_path / "e"
    )
    assert code == 2 and "--lengths [50]: a passkey document needs at least 102 bytes" in err
    code, out, err = run_cli(
        data_cli.main,
        capsys,
        "synth",
        "--task",
        "passkey",
        "--lengths",
        "200",
        "--depths",
        "0,1.5",
        "--out",
        tmp_path / "e",
    )
    assert code == 2 and "--depths [0.0, 1.5]: expected fractions in [0, 1]" in err
    assert not (tmp_path / "e").exists()
