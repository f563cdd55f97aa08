"""One rank dies mid-training: the whole job must fail promptly, name the rank, and keep its checkpoint.

Rank 1 is killed with SIGKILL (as by the OOM killer or a crashed node daemon) right after a
checkpoint at step >= KILL_AFTER was committed. The trainer has no fault-injection hook, so each
rank runs through a small wrapper that writes its pid to <run>/pids/rank<R>.pid and then runs
`reformer_dist.cli.train` in the same process; the test kills exactly that pid.

* torchrun --nproc_per_node 2: the survivor's gloo all_reduce fails at once ("Connection reset by
  peer"), torchrun tears the group down and exits non-zero within a second or so; its failure
  summary names rank 1 (exit code -9, the killed pid). `latest` points to a complete checkpoint whose
  manifest verifies, and `--resume auto` continues from it.
* launch/slurm/train.sbatch on the local 2-node cluster: `srun --kill-on-bad-exit=1` ends the step,
  the job is FAILED with a non-zero exit code, the log names task 1 on node2, and the checkpoint
  is intact.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reformer_dist.ondisk import step_of, verify_manifest
from reformer_dist.training.resume import find_resume
from tests.cluster.jsonl_records import read_records
from tests.cluster.slurm_cluster import CEILING_S
from tests.distributed.train_launcher import TINY, clean_env, free_port

pytestmark = pytest.mark.slow  # every test launches ranks (torchrun or srun); each marks which launcher

KILL_AFTER = 10  # kill rank 1 once a checkpoint at this step or later is committed
# The job must be over this long after the kill: far below the 600 s collective timeout it would
# otherwise hang for, and generous for a busy machine (it takes seconds on a quiet one).
EXIT_WITHIN_S = 240.0
FROZEN_TIMEOUT_S = 15  # train.dist_timeout_s of the frozen-rank run
# Never finishes on its own; checkpoints every 5 steps.
RUN = TINY + ["train.max_steps=100000", "checkpoint.every=5"]

PID_WRAPPER = '''
"""Record this rank's pid, then run the real trainer in this very process."""
import os, runpy, sys
from pathlib import Path

rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
d = Path(os.environ["RD_PID_DIR"])
d.mkdir(parents=True, exist_ok=True)
tmp = d / f".rank{rank}.pid.tmp"
tmp.write_text(str(os.getpid()))
os.replace(tmp, d / f"rank{rank}.pid")
sys.argv[0] = "reformer_dist.cli.train"
runpy.run_module("reformer_dist.cli.train", run_name="__main__", alter_sys=True)
'''


_records = read_records


def _wait_for_checkpoint(out: Path, alive, describe) -> int:
    """Block until rank 0 logged a committed checkpoint at step >= KILL_AFTER; returns its step.

    Event-driven: returns as soon as the checkpoint is logged and fails at once if the run ended; the
    ceiling only bounds a hang (startup on a loaded 2-core machine can take minutes).
    """
    deadline = time.monotonic() + CEILING_S
    while True:
        ckpts = [r["step"] for r in _records(out / "metrics.jsonl") if r.get("event") == "checkpoint"]
        if ckpts and ckpts[-1] >= KILL_AFTER and (out / "pids" / "rank1.pid").is_file():
            return ckpts[-1]
        if time.monotonic() > deadline or not alive():
            pytest.fail(f"no checkpoint at step >= {KILL_AFTER} (got {ckpts}):\n{describe()}")
        time.sleep(0.05)


def _kill_rank1(out: Path) -> int:
    pid = int((out / "pids" / "rank1.pid").read_text())
    assert _ours(pid, out), f"pid {pid} is not our rank 1"
    os.kill(pid, signal.SIGKILL)  # our own rank process: its pid was written by PID_WRAPPER
    return pid


def _ours(pid: int, out: Path) -> bool:
    """Whether `pid` is still one of this test's ranks (its command line has our output.dir), not a recycled pid."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    return f"output.dir={out}" in argv


def _stop(proc: subprocess.Popen, out: Path, pid_dir: Path) -> None:
    """Make sure nothing of this run survives a failed test: torchrun (own session) and its ranks.

    torchrun starts every rank in a session of its own, so killing torchrun's group would orphan
    them; the ranks are killed by the pids PID_WRAPPER recorded (ours only: the command line must
    still belong to this run).
    """
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    for f in pid_dir.glob("rank*.pid"):
        pid = int(f.read_text())
        if _ours(pid, out):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _assert_checkpoint_intact(out: Path, at_least: int) -> int:
    """`latest` names a complete checkpoint whose manifest verifies; --resume auto resolves to it."""
    root = out / "checkpoints"
    tag = (root / "latest").read_text().strip()
    step = step_of(tag)
    assert step is not None and step >= at_least, (tag, at_least)
    manifest = verify_manifest(root / tag)  # sizes and SHA-256 of every file
    assert (manifest["step"], manifest["world_size"]) == (step, 2)
    assert {"trainer_state/rank00000.pt", "trainer_state/rank00001.pt"} <= set(manifest["files"])
    point = find_resume("auto", root)
    assert point is not None and point.tag == tag, (point, tag)
    return step


def _start_torchrun(tmp_path: Path, repo_root: Path, extra: list[str] = ()):
    """2 ranks of the never-ending RUN under torchrun, each recording its pid; returns (proc, out, log, cmd, env)."""
    wrapper = tmp_path / "pid_train.py"
    wrapper.write_text(PID_WRAPPER)
    out = tmp_path / "run"
    args = ["--set", f"output.dir={out}"]
    for o in [*RUN, *extra]:
        args += ["--set", o]
    env = clean_env()
    env["RD_PID_DIR"] = str(out / "pids")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(wrapper),
        *args,
    ]
    log_path = tmp_path / "torchrun.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=repo_root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return proc, out, log_path, cmd, env


@pytest.mark.distributed
def test_torchrun_rank_death_fails_fast(tmp_path: Path, repo_root: Path) -> None:
    proc, out, log_path, cmd, env = _start_torchrun(tmp_path, repo_root)
    try:
        ckpt_step = _wait_for_checkpoint(
            out, lambda: proc.poll() is None, lambda: log_path.read_text(errors="replace")[-4000:]
        )
        killed = _kill_rank1(out)
        t_kill = time.monotonic()
        try:
            rc = proc.wait(timeout=EXIT_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"torchrun still running {EXIT_WITHIN_S:.0f}s after rank 1 was killed (a hung collective?)\n"
                f"{log_path.read_text(errors='replace')[-4000:]}"
            )
        took = time.monotonic() - t_kill
    finally:
        _stop(proc, out, out / "pids")
    text = log_path.read_text(errors="replace")
    print(f"rank 1 (pid {killed}) killed after the step-{ckpt_step} checkpoint; torchrun exited {rc} after {took:.1f}s")

    assert rc != 0, text[-4000:]
    # torchrun's failure summary names rank 1, killed by signal 9 (usually as the root cause; when
    # both ranks are seen failed in the same poll the tie may go to rank 0, so no order is assumed)
    summary = text[text.rfind("Failures:") :] if "Failures:" in text else ""
    entries = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+) \(pid: (\d+)\)", summary)
    assert ("1", "-9", str(killed)) in entries, text[-4000:]
    root = re.search(r"Root Cause \(first observed failure\):\s*\n\s*\[\d+\]:\s*\n.*\n.*\n\s*rank\s*:\s*(\d+)", summary)
    print(f"torchrun summary: {entries}; root cause rank {root and root.group(1)}")
    for rank in (0, 1):
        assert not [r for r in _records(out / "ranks" / f"rank{rank}.jsonl") if r["event"] == "end"]

    step = _assert_checkpoint_intact(out, ckpt_step)

    # ... and training continues from it
    env["RD_PID_DIR"] = str(out / "pids-resume")
    resume = [*cmd, "--set", f"train.max_steps={step + 2}", "--resume", "auto"]
    resume[resume.index(next(a for a in resume if a.startswith("--master_port=")))] = f"--master_port={free_port()}"
    with open(tmp_path / "resume.log", "w") as log:
        proc = subprocess.Popen(
            resume, cwd=repo_root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        proc.wait(timeout=CEILING_S)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"resumed run not done after {CEILING_S:.0f} s:\n"
            f"{(tmp_path / 'resume.log').read_text(errors='replace')[-3000:]}"
        )
    finally:
        _stop(proc, out, out / "pids-resume")
    text = (tmp_path / "resume.log").read_text(errors="replace")[-3000:]
    for rank in (0, 1):
        recs = _records(out / "ranks" / f"rank{rank}.jsonl")
        starts = [r for r in recs if r["event"] == "start"]
        assert len(starts) == 2 and starts[-1]["resume_step"] == step, (starts, text)
        tail = recs[recs.index(starts[-1]) :]
        assert [r["step"] for r in tail if r["event"] == "step"] == [step + 1, step + 2], text
        assert tail[-1]["event"] == "end", text


@pytest.mark.distributed
def test_torchrun_frozen_rank_fails_within_the_collective_timeout(tmp_path: Path, repo_root: Path) -> None:
    """A rank that stops responding (SIGSTOP: a hung NFS read, a wedged GPU) must not hang the job for
    torch's default 30 minutes: train.dist_timeout_s also covers the groups DeepSpeed creates itself."""
    proc, out, log_path, _, _ = _start_torchrun(tmp_path, repo_root, [f"train.dist_timeout_s={FROZEN_TIMEOUT_S}"])
    try:
        ckpt_step = _wait_for_checkpoint(
            out, lambda: proc.poll() is None, lambda: log_path.read_text(errors="replace")[-4000:]
        )
        pid = int((out / "pids" / "rank1.pid").read_text())
        assert _ours(pid, out)
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        limit = FROZEN_TIMEOUT_S + EXIT_WITHIN_S  # the collective timeout + the margin of a busy machine
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"job still running {limit:.0f} s after rank 1 froze (dist_timeout_s={FROZEN_TIMEOUT_S}; "
                f"torch's default would hang 30 min)\n{log_path.read_text(errors='replace')[-4000:]}"
            )
        took = time.monotonic() - t0
    finally:
        for f in (out / "pids").glob("rank*.pid"):
            p = int(f.read_text())
            if _ours(p, out):
                os.kill(p, signal.SIGCONT)
        _stop(proc, out, out / "pids")
    text = log_path.read_text(errors="replace")
    print(f"rank 1 frozen after the step-{ckpt_step} checkpoint; torchrun exited {rc} after {took:.1f}s")
    assert rc != 0, text[-4000:]
    assert re.search(r"[Tt]imed? ?out|timeout", text), text[-4000:]
    _assert_checkpoint_intact(out, ckpt_step)


@pytest.mark.cluster
def test_slurm_rank_death_fails_job(slurm_cluster, repo_root: Path, tmp_path: Path) -> None:
    wrapper = tmp_path / "pid_train.py"
    wrapper.write_text(PID_WRAPPER)
    out = tmp_path / "run"
    log = tmp_path / "train.out"
    script_args = ["--set", f"output.dir={out}"]
    for o in RUN:
        script_args += ["--set", o]
    env = {
        "PYTHON": sys.executable,
        "TORCH_EXTENSIONS_DIR": str(repo_root / ".torch_extensions"),
        "OMP_NUM_THREADS": "1",
        "REFORMER_TRAIN_MODULE": "pid_train",
        "PYTHONPATH": str(tmp_path),
        "RD_PID_DIR": str(out / "pids"),
    }
    job = slurm_cluster.sbatch(
        repo_root / "launch/slurm/train.sbatch",
        [
            "--partition=debug",
            "--gpus-per-node=0",
            "--nodes=2",
            "--ntasks-per-node=1",
            "--cpus-per-task=1",
            "--time=00:10:00",
            "--job-name=rd-fail",
            f"--output={log}",
        ],
        script_args=script_args,
        cwd=repo_root,
        extra_env=env,
    )

    def text() -> str:
        return log.read_text(errors="replace")[-5000:] if log.exists() else "<no log>"

    ckpt_step = _wait_for_checkpoint(
        out, lambda: slurm_cluster.job_info(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), text
    )
    killed = _kill_rank1(out)
    t_kill = time.monotonic()
    info = slurm_cluster.wait_job(
        job,
        lambda i: i.get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED"),
        timeout=EXIT_WITHIN_S,
    )
    took = time.monotonic() - t_kill
    print(
        f"rank 1 (pid {killed}) killed after the step-{ckpt_step} checkpoint; job {info['JobState']} "
        f"{info.get('ExitCode')} after {took:.1f}s"
    )

    assert info["JobState"] == "FAILED" and info.get("ExitCode") != "0:0", f"{info}\n{text()}"
    assert info.get("Restarts", "0") == "0", info  # a crash is not a preemption: no requeue
    full = log.read_text(errors="replace")
    assert re.search(r"srun: error: node2: task 1: Killed", full), text()
    assert re.search(r"srun exited with [1-9]", full), text()
    for rank in (0, 1):
        assert not [r for r in _records(out / "ranks" / f"rank{rank}.jsonl") if r["event"] in ("end", "preempted")]
    _assert_checkpoint_intact(out, ckpt_step)
