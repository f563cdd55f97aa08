"""The real trainer through `launch/slurm/train.sbatch` on the local 2-node SLURM cluster.

One job (2 nodes x 1 task, the TINY model on the quickstart config) covers the whole path:

1. srun starts 2 ranks that find each other from SLURM's variables: world size 2, launcher "slurm"
   in both ranks' start records;
2. once a step >= SIGNAL_AFTER is logged, USR1 goes to the batch shell (`scancel --batch
   --signal=USR1`, what `#SBATCH --signal=B:USR1@120` does before the time limit); the script
   forwards it to the ranks, they agree on a step P, save a complete checkpoint there, and rank 0
   requeues the job;
3. the requeued job (Restarts 1) resumes from step P with `--resume auto` and runs to max_steps:
   the steps in metrics.jsonl are exactly 1..MAX_STEPS, none lost or repeated, and it ends
   COMPLETED with exit code 0:0 and a verified final checkpoint.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from reformer_dist.ondisk import verify_manifest
from tests.cluster.jsonl_records import read_records
from tests.cluster.slurm_cluster import CEILING_S
from tests.distributed.train_launcher import TINY

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

LOCAL_JOB_ARGS = [
    "--partition=debug",
    "--gpus-per-node=0",
    "--nodes=2",
    "--ntasks-per-node=1",
    "--cpus-per-task=1",
    "--time=00:20:00",
]
SIGNAL_AFTER = 5  # send USR1 once this step is logged
MAX_STEPS = 300  # the first run must still be training when USR1 arrives: 20-30 ms a step, signal path < 1 s


_records = read_records


def _log(path: Path) -> str:
    """The whole job log (assertions search all of it; a failure message shows its tail)."""
    return path.read_text(errors="replace") if path.exists() else f"<{path} missing>"


def test_train_sbatch_two_nodes_preempt_requeue_resume(slurm_cluster, repo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    log = tmp_path / "train.out"
    script_args = ["--set", f"output.dir={out}"]
    for o in TINY + [f"train.max_steps={MAX_STEPS}", "checkpoint.at_end=true", "train.requeue=true"]:
        script_args += ["--set", o]
    env = {
        "PYTHON": sys.executable,
        "TORCH_EXTENSIONS_DIR": str(repo_root / ".torch_extensions"),
        "OMP_NUM_THREADS": "1",
    }
    t0 = time.monotonic()
    job = slurm_cluster.sbatch(
        repo_root / "launch/slurm/train.sbatch",
        [*LOCAL_JOB_ARGS, "--job-name=rd-train", f"--output={log}"],
        script_args=script_args,
        cwd=repo_root,
        extra_env=env,
    )

    # -- wait for the first run to log step SIGNAL_AFTER, then USR1 to the batch shell
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + CEILING_S
    while not any(r.get("event") == "step" and r["step"] >= SIGNAL_AFTER for r in _records(metrics)):
        info = slurm_cluster.job_info(job)
        if time.monotonic() > deadline or info.get("JobState") in ("FAILED", "COMPLETED", "CANCELLED", "TIMEOUT"):
            slurm_cluster.run(["scancel", job])
            pytest.fail(f"training never reached step {SIGNAL_AFTER}: {info}\n{_log(log)[-6000:]}")
        time.sleep(0.1)
    t_signal = time.monotonic() - t0
    sig = slurm_cluster.run(["scancel", "--batch", "--signal=USR1", job], timeout=10)
    assert sig.returncode == 0, sig.stderr

    info = slurm_cluster.wait_job(
        job,
        lambda i: (
            i.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
            and i.get("Restarts", "0") != "0"
        ),
    )
    text = _log(log)
    print(f"step {SIGNAL_AFTER} after {t_signal:.1f}s, job done after {time.monotonic() - t0:.1f}s")

    # -- the job: requeued once by the trainer, then completed
    tail = text[-6000:]
    assert (info["JobState"], info["Restarts"], info.get("ExitCode")) == ("COMPLETED", "1", "0:0"), f"{info}\n{tail}"
    assert "got SIGUSR1: forwarding to the ranks" in text, tail
    assert "restart=0 " in text and "restart=1 " in text and "master=127.0.0.1:" in text, tail

    # -- each rank: start (world 2, slurm) .. preempted at P | start (resumed at P) .. end at MAX_STEPS
    stops = []
    for rank in (0, 1):
        recs = _records(out / "ranks" / f"rank{rank}.jsonl")
        assert recs, f"rank {rank} wrote no result file\n{text}"
        kinds = [r["event"] for r in recs if r["event"] not in ("step", "checkpoint")]  # checkpoint: rank 0 only
        assert kinds == ["start", "preempted", "start", "end"], (rank, kinds, tail)
        first, second = [r for r in recs if r["event"] == "start"]
        for s in (first, second):
            assert (s["rank"], s["world_size"], s["launcher"], s["dp_size"]) == (rank, 2, "slurm", 2), s
        (preempted,) = [r for r in recs if r["event"] == "preempted"]
        stop = preempted["step"]
        assert preempted["signal"] == "SIGUSR1", preempted
        assert SIGNAL_AFTER <= stop < MAX_STEPS, (preempted, "the first run ended before USR1 arrived?")
        assert first["resume_step"] is None and second["resume_step"] == stop, (first, second)
        assert second["resume_from"] == str(out / "checkpoints" / f"step_{stop:08d}")
        i_pre, i_second = recs.index(preempted), recs.index(second)
        steps_before = [r["step"] for r in recs[:i_pre] if r["event"] == "step"]
        steps_after = [r["step"] for r in recs[i_second:] if r["event"] == "step"]
        assert steps_before == list(range(1, stop + 1)), steps_before
        assert steps_after == list(range(stop + 1, MAX_STEPS + 1)), steps_after
        assert recs[-1]["event"] == "end" and recs[-1]["step"] == MAX_STEPS
        stops.append(stop)
    assert stops[0] == stops[1], f"ranks stopped at different steps: {stops}"
    stop = stops[0]
    print(f"USR1 after step {SIGNAL_AFTER} was logged: both ranks stopped at step {stop}")

    # -- rank 0's metrics.jsonl: steps exactly 1..MAX_STEPS across both runs, nothing lost or repeated
    recs = _records(metrics)
    assert [r["step"] for r in recs if r["event"] == "step"] == list(range(1, MAX_STEPS + 1))
    events = [(r["event"], r.get("step"), r.get("resume_step")) for r in recs if r["event"] != "step"]
    assert events == [
        ("start", None, None),
        ("checkpoint", stop, None),
        ("preempted", stop, None),
        ("start", None, stop),
        ("checkpoint", MAX_STEPS, None),
        ("end", MAX_STEPS, None),
    ], events

    # -- checkpoints: the preemption one and the final one are complete and intact
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == f"step_{MAX_STEPS:08d}"
    for step in (stop, MAX_STEPS):
        manifest = verify_manifest(root / f"step_{step:08d}")
        assert (manifest["step"], manifest["world_size"]) == (step, 2)
        assert {"trainer_state/rank00000.pt", "trainer_state/rank00001.pt"} <= set(manifest["files"])
