"""One run per output folder (issue #15): a second run refuses, naming the folder and the holder; stale
locks of dead processes are taken over; the first run's files are never touched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from reformer_dist.run_lock import LOCK_NAME, Holder, RunLock, RunLockedError
from tests.distributed.train_launcher import TINY, clean_env
from tests.unit.cli_cases import snapshot

REPO = Path(__file__).resolve().parents[2]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _plant(folder: Path, **changes) -> Holder:
    """A lock file as another process would have written it."""
    lock = RunLock(folder)
    lock.acquire()
    h = replace(lock.held, token="theirs", command="reformer-train --config other.toml", **changes)
    lock.path.write_text(json.dumps(asdict(h)))
    lock.held = None
    return h


def test_second_lock_on_a_live_folder_is_refused_and_names_the_holder(tmp_path):
    first = RunLock(tmp_path / "run")
    assert first.acquire() is None
    body = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
    assert body["pid"] == os.getpid() and body["host"]
    with pytest.raises(RunLockedError) as e:
        RunLock(tmp_path / "run").acquire()
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'run'}: output.dir is in use") and f"pid {os.getpid()}" in msg
    first.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    second = RunLock(tmp_path / "run")
    assert second.acquire() is None  # free again
    second.release()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # no temporary files left


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = _dead_pid()
    _plant(tmp_path, pid=dead, proc_start=None)
    lock = RunLock(tmp_path)
    note = lock.acquire()
    assert note and f"pid {dead}" in note and "no longer running" in note
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()


def test_recycled_pid_is_not_the_holder(tmp_path):
    _plant(tmp_path, proc_start="1")  # our pid, but a process that started at another time
    assert "no longer running" in RunLock(tmp_path).acquire()


def test_holder_on_another_host_is_refused_unless_it_is_this_slurm_job(tmp_path, monkeypatch):
    _plant(tmp_path, host="node-elsewhere", pid=12345, job="777")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(RunLockedError, match=rf"pid 12345 on host node-elsewhere.*delete {tmp_path / LOCK_NAME}"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "777")  # the requeued job itself, now on another node
    assert "earlier start of this SLURM job" in RunLock(tmp_path).acquire()


def test_release_leaves_a_lock_that_is_not_ours(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    other = replace(lock.held, token="someone-else")
    lock.path.write_text(json.dumps(asdict(other)))
    lock.release()
    assert json.loads(lock.path.read_text())["token"] == "someone-else"


# ------------------------------------------------------------------------------------------ real processes
def _args(out: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "reformer_dist.cli.train", "--set", f"output.dir={out}"]
    for o in [*TINY, *extra]:
        args += ["--set", o]
    return args


def _wait(cond, proc: subprocess.Popen, what: str, log: Path, ceiling: float = 600) -> None:
    """Until cond() holds; fails early if proc ended, late only at a generous ceiling."""
    deadline = time.monotonic() + ceiling
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"run ended (exit {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {ceiling:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def _steps(out: Path) -> list[int]:
    p = out / "ranks" / "rank0.jsonl"
    if not p.is_file():
        return []
    recs = [json.loads(line) for line in p.read_text().splitlines() if line.endswith("}")]
    return [r["step"] for r in recs if r.get("event") == "step"]


@pytest.mark.slow
def test_two_runs_in_one_folder(tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "first.log"
    env = clean_env()
    with open(log, "w") as f:  # never ends by itself; checkpoints every 3 steps
        first = subprocess.Popen(
            _args(out, "train.max_steps=1000000", "checkpoint.every=3"),
            cwd=tmp_path,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait(lambda: len(_steps(out)) >= 1, first, "a first step", log)
        before = {p.name for p in out.iterdir()}
        written_at_start = {n: (out / n).stat().st_mtime_ns for n in ("config.toml", "deepspeed_config.json")}

        second = subprocess.run(
            _args(out, "train.max_steps=5"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert second.returncode == 2, second.stderr[-3000:]
        assert (
            f"reformer-train: error: {out}: output.dir is in use by another reformer-train run (pid {first.pid}"
            in second.stderr
        )
        # the live run's files were not moved aside or appended to, and it keeps training
        assert before <= {p.name for p in out.iterdir()} and not list(out.glob("replaced-*"))
        assert {n: (out / n).stat().st_mtime_ns for n in written_at_start} == written_at_start
        starts = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["event"] == "start"]
        assert len(starts) == 1
        n = len(_steps(out))
        _wait(
            lambda: len(_steps(out)) > n and (out / "checkpoints" / "latest").is_file(),
            first,
            "more steps and a checkpoint",
            log,
        )
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGKILL)  # our own child: a crash that leaves its lock behind
        first.wait(timeout=600)
    assert (out / LOCK_NAME).is_file()

    # the dead run's lock is stale: the next run takes over and resumes from the last checkpoint
    third = subprocess.run(
        _args(out, f"train.max_steps={max(_steps(out)) + 2}") + ["--resume", "auto"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"took over the stale lock {out / LOCK_NAME} of pid {first.pid}" in third.stderr
    assert "resumed from" in third.stderr
    assert not (out / LOCK_NAME).exists()  # released at the end


@pytest.mark.slow
def test_shared_checkpoint_dir_is_refused_while_another_run_uses_it(tmp_path):
    # #26: only output.dir was locked; run B's rotation deleted its own checkpoints (A's steps were higher)
    shared = tmp_path / "shared"
    _plant(shared, pid=os.getpid())  # a live run A (this process) holds the checkpoint root
    (shared / "step_00000007").mkdir()
    (shared / "step_00000007" / "MANIFEST.json").write_text("{}")
    before = snapshot(shared)
    b = subprocess.run(
        _args(tmp_path / "b", "train.max_steps=2", f"checkpoint.dir={shared}", "checkpoint.every=1"),
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert b.returncode == 2, b.stderr[-3000:]
    assert (
        f"reformer-train: error: {shared}: checkpoint.dir is in use by another reformer-train run (pid {os.getpid()}"
        in b.stderr
        and "choose another checkpoint.dir" in b.stderr
    ), b.stderr[-3000:]
    assert snapshot(shared) == before
    assert not (tmp_path / "b" / LOCK_NAME).exists() and not (tmp_path / "b" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_resume_auto_refuses_the_checkpoint_of_another_run_in_a_shared_checkpoint_dir(tmp_path):
    # #26: B's --resume auto silently loaded A's checkpoint
    shared = tmp_path / "shared"
    a = subprocess.run(
        _args(tmp_path / "a", "train.max_steps=2", f"checkpoint.dir={shared}", "checkpoint.at_end=true"),
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert a.returncode == 0 and (shared / "latest").is_file(), a.stderr[-3000:]
    before = snapshot(shared)
    b = subprocess.run(
        _args(tmp_path / "b", "train.max_steps=4", f"checkpoint.dir={shared}") + ["--resume", "auto"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert b.returncode == 2, b.stderr[-3000:]
    assert (
        f"--resume auto: the newest checkpoint in checkpoint.dir {shared}, step_00000002, was written by the run "
        f"in output.dir {tmp_path / 'a'}, not by this one ({tmp_path / 'b'})" in b.stderr
    ), b.stderr[-3000:]
    assert f"pass --resume {shared / 'step_00000002'}" in b.stderr
    assert snapshot(shared) == before and not (shared / LOCK_NAME).exists()
    # a fresh start there would have moved A's checkpoints into B's folder (a third run moved both runs')
    c = subprocess.run(
        _args(tmp_path / "b", "train.max_steps=1", f"checkpoint.dir={shared}"),
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert (
        c.returncode == 2
        and f"checkpoint.dir {shared} holds step_00000002 of the run in output.dir "
        f"{tmp_path / 'a'}, not of this one ({tmp_path / 'b'}); a fresh start would move it aside"
        in c.stderr
    ), c.stderr[-3000:]
    assert snapshot(shared) == before and not list((tmp_path / "b").glob("replaced-*"))


@pytest.mark.slow
def test_refused_resume_leaves_the_run_folder_alone_and_a_fresh_start_moves_config_toml_aside(tmp_path):
    # #26: a refused resume rewrote config.toml and deepspeed_config.json; a fresh start overwrote config.toml
    out = tmp_path / "run"
    a = subprocess.run(
        _args(out, "train.max_steps=2", "checkpoint.at_end=true"),
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert a.returncode == 0, a.stderr[-3000:]
    before = snapshot(out)
    b = subprocess.run(
        _args(out, "train.max_steps=4", "model.d_ff=32", "deepspeed.zero_stage=2") + ["--resume", "auto"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert (
        b.returncode == 2
        and "checkpoint does not fit this run:\n  model.d_ff: checkpoint has 64, this run 32" in b.stderr
    ), b.stderr[-3000:]
    assert snapshot(out) == before

    c = subprocess.run(
        _args(out, "train.max_steps=1", "model.d_ff=32"),
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert c.returncode == 0, c.stderr[-3000:]
    (aside,) = out.glob("replaced-*")
    moved = snapshot(aside)
    assert {k: moved[k] for k in ("config.toml", "deepspeed_config.json", "metrics.jsonl")} == {
        k: before[k] for k in ("config.toml", "deepspeed_config.json", "metrics.jsonl")
    }
    assert moved["checkpoints/latest"] == before["checkpoints/latest"]
    assert "d_ff = 32" in (out / "config.toml").read_text()
