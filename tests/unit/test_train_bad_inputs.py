"""Bad-input sweep of `reformer-train` (issues #15, #17).

Errors caught before any process group starts run in-process through `main(argv)`; what needs a real
process (signals, a full disk during a save, a damaged shard read mid-run, resuming) runs the trainer
as a subprocess on a tiny model. Every case asserts a message naming the file or key, the exit code,
and that nothing complete was lost or half-written. docs/troubleshooting.md lists the cases.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from reformer_dist.cli.train import main
from reformer_dist.data.tokenizers import load_tokenizer
from reformer_dist.data.writer import ShardWriter
from reformer_dist.ondisk import verify_manifest
from tests.distributed.train_launcher import TINY, clean_env
from tests.unit.cli_cases import run_cli

REPO = Path(__file__).resolve().parents[2]

DRIVER = REPO / "tests" / "distributed" / "fault_driver.py"


@pytest.fixture(autouse=True)
def no_training_in_process(monkeypatch):
    """An in-process case that got past the checks must fail here, not start DeepSpeed inside pytest."""

    def refuse(*args, **kwargs):
        raise AssertionError("the config passed every check: training would start")

    monkeypatch.setattr("reformer_dist.cli.train._train", refuse)


def run(capsys, *argv) -> tuple[int, str, str]:
    return run_cli(main, capsys, *argv)


def tiny(out: Path, *extra: str) -> list[str]:
    args = ["--set", f"output.dir={out}"]
    for o in [*TINY, *extra]:
        args += ["--set", o]
    return args


def make_store(path: Path, train_tokens: int, val_tokens: int) -> Path:
    with ShardWriter(path, load_tokenizer("bytes"), shard_tokens=1000) as w:
        w.add("train", np.arange(train_tokens) % 256)
        if val_tokens:
            w.add("validation", np.arange(val_tokens) % 256)
    return path


def tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------------------------- before any process group
@pytest.fixture
def bad(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "broken.toml").write_text("[train\nlr = 1")
    (tmp_path / "opt.json").write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    (tmp_path / "empty_ckpts").mkdir()
    make_store(tmp_path / "small", 20, 20)
    make_store(tmp_path / "noval", 5000, 0)
    return {"tmp": tmp_path}


CASES = [  # id, argv after tiny(<tmp>/run), expected start of the message after "reformer-train: error: "
    ("unknown-key", ["--set", "train.lrr=1"], "train.lrr: unknown key"),
    ("wrong-type", ["--set", "train.lr=fast"], "train.lr: expected a positive number (got 'fast')"),
    (
        "seq-len-above-model-max",
        ["--set", "data.seq_len=100000"],
        "data.seq_len: 100000 exceeds the model's maximum length 64",
    ),
    ("missing-data", ["--set", "data.path={tmp}/nope"], "data.path: {tmp}/nope/manifest.json: no such folder"),
    (
        "other-tokenizer",
        ["--set", "data.tokenizer=sentencepiece:abcd"],
        "data.path: builtin: store was tokenised with 'bytes', but the run expects 'sentencepiece:abcd'",
    ),
    (
        "vocab-below-store",
        ["--set", "model.vocab_size=200"],
        "model.vocab_size: 200 is smaller than the data's vocabulary (257, tokenizer bytes)",
    ),
    (
        "train-split-too-small",
        ["--set", "data.path={tmp}/small"],
        "data.train_split = 'train': {tmp}/small: split 'train' has 20 tokens; a window of seq_len 32 needs 33",
    ),
    (
        "no-validation-split",
        ["--set", "data.path={tmp}/noval", "--set", "eval.at_end=true"],
        "data.eval_split = 'validation': {tmp}/noval: split 'validation' has 0 tokens",
    ),
    ("output-dir-is-a-file", ["--set", "output.dir={tmp}/a_file"], "output.dir: {tmp}/a_file is a file"),
    (
        "output-dir-under-a-file",
        ["--set", "output.dir={tmp}/a_file/run"],
        "output.dir: {tmp}/a_file/run cannot be created: {tmp}/a_file is a file",
    ),
    ("checkpoint-dir-is-a-file", ["--set", "checkpoint.dir={tmp}/a_file"], "checkpoint.dir: {tmp}/a_file is a file"),
    ("missing-config", ["--config", "{tmp}/nope.toml"], "--config {tmp}/nope.toml: cannot read"),
    ("invalid-toml", ["--config", "{tmp}/broken.toml"], "{tmp}/broken.toml: not valid TOML"),
    ("set-without-value", ["--set", "trainlr"], "--set 'trainlr': expected section.key=value"),
    (
        "deepspeed-json-optimizer",
        ["--set", "deepspeed.config={tmp}/opt.json"],
        "deepspeed.config ({tmp}/opt.json): key 'optimizer' is not allowed",
    ),
    (
        "global-batch-not-a-multiple",
        ["--set", "train.global_batch=3", "--set", "train.micro_batch=2"],
        "train.global_batch: 3 is not a multiple of train.micro_batch * data-parallel size = 2 * 1 = 2",
    ),
    ("threads-zero", ["--set", "train.threads=0"], 'train.threads: expected "auto" or a positive integer'),
    ("threads-unbounded", ["--set", "train.threads=1000000"], "train.threads: 1000000 is more than 4 x the "),
    ("resume-missing", ["--resume", "{tmp}/nope"], "--resume {tmp}/nope: no such file or folder"),
    (
        "resume-empty-folder",
        ["--resume", "{tmp}/empty_ckpts"],
        "--resume {tmp}/empty_ckpts: no checkpoint in this folder",
    ),
]


@pytest.mark.parametrize("case, argv, expect", CASES, ids=[c[0] for c in CASES])
def test_refused_before_any_process_group(bad, capsys, case, argv, expect):
    tmp = bad["tmp"]
    before = tree(tmp)
    # --dry-run checks exactly as much, except that it may plan a run whose data is not prepared yet
    for dry in ([], ["--dry-run"]) if case != "missing-data" else ([],):
        code, _, err = run(capsys, *tiny(tmp / "run"), *[a.format(tmp=tmp) for a in argv], *dry)
        assert code == 2, err
        assert err.startswith(f"reformer-train: error: {expect.format(tmp=tmp)}"), err
        assert "Traceback" not in err
    assert not (tmp / "run").exists() and tree(tmp) == before  # nothing written, nothing changed


def test_malformed_omp_num_threads_is_refused_naming_the_variable(tmp_path, capsys, monkeypatch):
    # #26: OMP_NUM_THREADS=junk was silently replaced by a default, OMP_NUM_THREADS=100000 used as given
    for value in ("junk", "100000"):
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        code, _, err = run(capsys, *tiny(tmp_path / "run"), "--dry-run")
        assert code == 2 and err.startswith(
            f"reformer-train: error: OMP_NUM_THREADS={value!r}: expected a positive integer up to "
        ), err
    assert not (tmp_path / "run").exists()


def test_split_errors_say_what_to_do(bad, capsys):
    tmp = bad["tmp"]
    _, _, err = run(capsys, *tiny(tmp / "run", f"data.path={tmp}/noval", "eval.at_end=true"))
    assert "eval.every = 0, eval.at_end = false" in err and "--val-fraction" in err
    _, _, err = run(capsys, *tiny(tmp / "run", f"data.path={tmp}/small"))
    assert "lower data.seq_len or train.micro_batch" in err and "needs 33" in err


@pytest.mark.parametrize("config", ["million_1gpu", "enwik8_64k", "multinode_zero3"])
def test_readme_dry_run_works_without_the_data(tmp_path, capsys, monkeypatch, config):
    monkeypatch.chdir(tmp_path)  # a fresh clone: no data/ folder
    code, out, err = run(capsys, "--config", REPO / "configs" / f"{config}.toml", "--dry-run")
    assert code == 0, err
    assert "# data: NOT CHECKED" in out and "# batch plan:" in out and "# deepspeed config:" in out
    assert "reformer-train: warning: data.path:" in err and "no such folder" in err and "reformer-data shard" in err


# ---------------------------------------------------------------------------------- real processes
def _train(
    tmp_path: Path,
    out: Path,
    *extra: str,
    args: tuple[str, ...] = (),
    env: dict | None = None,
    driver: bool = False,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    target = [str(DRIVER)] if driver else ["-m", "reformer_dist.cli.train"]
    return subprocess.run(
        [sys.executable, *target, *tiny(out, *extra), *args],
        cwd=tmp_path,
        env={**clean_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _records(out: Path, event: str) -> list[dict]:
    p = out / "ranks" / "rank0.jsonl"
    if not p.is_file():
        return []
    return [
        r
        for r in map(json.loads, (line for line in p.read_text().splitlines() if line.endswith("}")))
        if r.get("event") == event
    ]


@pytest.mark.slow
def test_training_without_a_validation_split_when_evaluation_is_off(tmp_path):
    store = make_store(tmp_path / "noval", 5000, 0)
    p = _train(
        tmp_path, tmp_path / "run", f"data.path={store}", "train.max_steps=2", "eval.every=0", "eval.at_end=false"
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert [r["step"] for r in _records(tmp_path / "run", "end")] == [2]


@pytest.mark.slow
def test_out_of_range_token_in_a_shard_of_the_right_size(tmp_path):
    store = make_store(tmp_path / "store", 5000, 1000)
    shard = store / "train-00002.bin"
    data = np.fromfile(shard, dtype=np.uint16)
    data[:] = 40000  # right size, wrong content: only `verify` (sha256) or reading it finds out
    data.tofile(shard)
    before = tree(store)
    p = _train(tmp_path, tmp_path / "run", f"data.path={store}", "train.max_steps=50", "train.micro_batch=4")
    assert p.returncode == 2, p.stderr[-3000:]
    assert f"reformer-train: error: {shard}: token id 40000 at train token" in p.stderr
    assert f"run `reformer-data verify {store}`" in p.stderr and "Traceback" not in p.stderr
    assert tree(store) == before


@pytest.mark.slow
def test_full_disk_kill_during_save_and_a_corrupted_checkpoint(tmp_path):
    out = tmp_path / "run"
    common = ("checkpoint.every=1", "checkpoint.keep_last=5")
    # 1. the disk fills up during step 2's save (torch's own wording of a short write)
    p = _train(
        tmp_path, out, "train.max_steps=5", *common, driver=True, env={"FAULT_SAVE_STEP": "2", "FAULT_SAVE": "torch"}
    )
    assert p.returncode == 2, p.stderr[-3000:]
    ck = out / "checkpoints"
    assert (
        f"reformer-train: error: {ck / 'step_00000002'}: checkpoint save failed on rank 0: no space left on device"
    ) in p.stderr
    assert f"the previous checkpoint {ck / 'step_00000001'} is intact" in p.stderr
    assert (ck / "latest").read_text() == "step_00000001" and not (ck / "step_00000002").exists()
    verify_manifest(ck / "step_00000001")

    # 2. resumed, it is SIGKILLed in the middle of step 3's save: step 3 is left without a manifest
    p = _train(
        tmp_path,
        out,
        "train.max_steps=5",
        *common,
        args=("--resume", "auto"),
        driver=True,
        env={"FAULT_SAVE_STEP": "3", "FAULT_SAVE": "kill"},
    )
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert (ck / "latest").read_text() == "step_00000002" and not (ck / "step_00000003" / "MANIFEST.json").exists()

    # 3. --resume auto skips the incomplete save, takes over the dead run's lock, and finishes
    p = _train(tmp_path, out, "train.max_steps=5", *common, args=("--resume", "auto"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stderr and "step_00000002 at step 2 (skipped incomplete: step_00000003)" in p.stderr
    assert "took over the stale lock" in p.stderr
    assert [r["step"] for r in _records(out, "end")] == [5]
    verify_manifest(ck / "step_00000005")

    # 4. a corrupted newest checkpoint is named, and nothing falls back silently or changes
    victim = ck / "step_00000005" / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[:-100])
    before = tree(out)
    p = _train(tmp_path, out, "train.max_steps=6", *common, args=("--resume", "auto"))
    assert p.returncode == 2, p.stderr[-3000:]
    assert f"reformer-train: error: {victim}: truncated or altered (" in p.stderr
    assert tree(out) == before


def _start(
    tmp_path: Path,
    out: Path,
    *extra: str,
    args: tuple[str, ...] = (),
    env: dict | None = None,
    log_name: str = "run.log",
) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / log_name
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, str(DRIVER), *tiny(out, *extra), *args],
            cwd=tmp_path,
            env={**clean_env(), **(env or {})},
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    return proc, log


def _wait(cond, proc: subprocess.Popen, log: Path, what: str, ceiling: float = 600) -> None:
    deadline = time.monotonic() + ceiling
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"run ended (exit {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {ceiling:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def _finish(proc: subprocess.Popen, log: Path, ceiling: float = 600) -> int:
    try:
        return proc.wait(timeout=ceiling)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"run still going {ceiling:.0f} s after the signal:\n{log.read_text()[-3000:]}")


def _signal_run(tmp_path: Path, out: Path, sig: int, log_name: str, *extra: str, args: tuple[str, ...] = ()):
    """Start a never-ending run, send `sig` once it has logged a step, return (exit code, log text)."""
    proc, log = _start(
        tmp_path, out, "train.max_steps=1000000", "checkpoint.every=0", *extra, args=args, log_name=log_name
    )
    n = len(_records(out, "step"))
    _wait(lambda: len(_records(out, "step")) > n, proc, log, "a training step")
    proc.send_signal(sig)
    return _finish(proc, log), log.read_text()


@pytest.mark.slow
def test_sigterm_and_ctrl_c_checkpoint_and_resume(tmp_path):
    out = tmp_path / "run"
    ck = out / "checkpoints"
    code, text = _signal_run(tmp_path, out, signal.SIGTERM, "term.log")
    assert code == 0, text[-3000:]
    (pre,) = _records(out, "preempted")
    assert pre["signal"] == "SIGTERM" and (ck / "latest").read_text() == f"step_{pre['step']:08d}"
    verify_manifest(ck / f"step_{pre['step']:08d}")

    code, text = _signal_run(tmp_path, out, signal.SIGINT, "int.log", args=("--resume", "auto"))
    assert code == 130, text[-3000:]
    (inter,) = _records(out, "interrupted")
    assert inter["step"] > pre["step"] and (ck / "latest").read_text() == f"step_{inter['step']:08d}"
    saved = ck / f"step_{inter['step']:08d}"
    assert f"interrupted (Ctrl-C) at step {inter['step']}: checkpoint saved in {saved}" in text
    assert "--resume auto" in text and "KeyboardInterrupt" not in text and "Traceback" not in text
    verify_manifest(saved)

    p = _train(tmp_path, out, f"train.max_steps={inter['step'] + 1}", "checkpoint.every=0", args=("--resume", "auto"))
    assert p.returncode == 0, p.stderr[-3000:]
    starts = _records(out, "start")
    assert [s["resume_step"] for s in starts] == [None, pre["step"], inter["step"]]
    assert [r["step"] for r in _records(out, "end")] == [inter["step"] + 1]


@pytest.mark.slow
def test_second_ctrl_c_aborts_at_once(tmp_path):
    out = tmp_path / "run"
    proc, log = _start(tmp_path, out, "train.max_steps=1000000", "checkpoint.every=1", env={"FAULT_HANG_STEP": "3"})
    _wait(lambda: (out / "hanging").is_file(), proc, log, "step 3")
    latest = (out / "checkpoints" / "latest").read_text()
    proc.send_signal(signal.SIGINT)  # noted: would checkpoint at the end of step 3, which never comes
    _wait(lambda: "checkpoint at the end of this step" in log.read_text(), proc, log, "the Ctrl-C notice")
    proc.send_signal(signal.SIGINT)
    assert _finish(proc, log, ceiling=120) == -signal.SIGINT  # killed by the signal's default action
    assert (out / "checkpoints" / "latest").read_text() == latest == "step_00000002"
    verify_manifest(out / "checkpoints" / latest)
