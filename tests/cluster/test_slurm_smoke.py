"""End-to-end checks on a real local SLURM cluster (2 simulated nodes on localhost).

* hostlist expansion agrees with ``scontrol show hostnames``;
* ``srun`` on 2 nodes x 1 task: discover() gives ranks 0/1, world size 2 and one master;
* ``launch/slurm/train.sbatch`` with a stand-in trainer: USR1 to the batch shell is forwarded to
  the ranks, they stop at the same step, checkpoint, rank 0 requeues, the job resumes and finishes;
* ``launch/slurm/train_deepspeed.sbatch``: the deepspeed launcher (slurm backend) starts 2 ranks
  that find each other and all_reduce over gloo.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

from reformer_dist.parallel.hostlist import expand_nodelist
from tests.cluster.slurm_cluster import CEILING_S

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

# Job options that replace the GPU-cluster defaults of the launch scripts on the local cluster.
LOCAL_JOB_ARGS = [
    "--partition=debug",
    "--gpus-per-node=0",
    "--nodes=2",
    "--ntasks-per-node=1",
    "--cpus-per-task=1",
    "--mem=0",
    "--time=00:15:00",
]

# A stand-in for reformer_dist.cli.train: same CLI (--config/--set/--resume), the preemption
# protocol the real trainer follows, and JSON events per rank instead of training.
STUB_TRAINER = """
import argparse, json, os, sys, time
from pathlib import Path

import torch
import torch.distributed as dist

from reformer_dist.parallel.env import discover, export_env
from reformer_dist.training.preemption import PreemptionHandler, requeue_slurm_job

p = argparse.ArgumentParser()
p.add_argument("--config", required=True)
p.add_argument("--set", action="append", default=[])
p.add_argument("--resume", default=None)
p.add_argument("--local_rank", type=int, default=None)  # appended by deepspeed's local launcher
p.add_argument("--out", required=True)
p.add_argument("--mode", choices=["preempt", "report"], default="preempt")
p.add_argument("--requeue", action="store_true")
a = p.parse_args()
out = Path(a.out)

handler = PreemptionHandler().install()
env = discover()
export_env(env)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))

def event(**kw):
    with open(out / f"events-rank{rank}.jsonl", "a") as f:
        f.write(json.dumps(kw) + "\\n")

total = torch.tensor([float(rank + 1)])
dist.all_reduce(total)
event(event="start", rank=rank, world_size=world, source=env.source, master=env.master_addr,
      port=env.master_port, restart=restart, config=a.config, resume=a.resume,
      node=os.environ.get("SLURMD_NODENAME"), allreduce=total.item())
if a.mode == "report":
    dist.destroy_process_group()
    sys.exit(0)

ckpt = out / f"ckpt-rank{rank}.json"
step = json.loads(ckpt.read_text())["step"] if a.resume == "auto" and ckpt.exists() else 0
event(event="resumed", step=step)
dist.barrier()
if rank == 0:
    (out / f"running-{restart}").write_text(str(step))
# first run: until preempted (capped); after a requeue: 20 more steps
last = step + 20 if restart else step + 1500
while step < last:
    time.sleep(0.02)
    step += 1
    if handler.sync():
        ckpt.write_text(json.dumps({"step": step}))
        dist.barrier()
        event(event="preempted", step=step, signal=handler.signal_name)
        if a.requeue and rank == 0:
            event(event="requeue", ok=requeue_slurm_job())
        dist.destroy_process_group()
        sys.exit(0)
event(event="done", step=step)
dist.destroy_process_group()
"""


def _events(out: Path, rank: int) -> list[dict]:
    path = out / f"events-rank{rank}.jsonl"
    assert path.exists(), f"rank {rank} wrote no events"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"<{path} missing>"


def test_expand_nodelist_matches_scontrol(slurm_cluster) -> None:
    for spec in [
        "node[01-03,07],gpu5,rack[1-2]-n[3-4]",
        "node[8-11]",
        "node[08-11]",
        "a[1,3],b[2]",
        "n[0998-1002]",
        "x[1-2]y[09-10]",
    ]:
        res = slurm_cluster.run(["scontrol", "show", "hostnames", spec], timeout=10)
        assert res.returncode == 0, res.stderr
        assert expand_nodelist(spec) == res.stdout.split(), spec


def test_two_nodes_discover(slurm_cluster, tmp_path: Path) -> None:
    """sbatch --wait: 2 nodes x 1 task, discover() per rank from SLURM's variables."""
    script = tmp_path / "smoke.sbatch"
    script.write_text(
        textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --job-name=rd-smoke
        #SBATCH --nodes=2
        #SBATCH --ntasks-per-node=1
        #SBATCH --time=00:10:00
        set -euo pipefail
        PY={sys.executable}
        CODE='import os, sys
        from reformer_dist.parallel.env import discover
        print("DISCOVER", sys.argv[1], os.environ.get("SLURMD_NODENAME", "-"), discover().to_json(), flush=True)'
        "$PY" -c "$CODE" batch   # the batch shell itself: one process although SLURM_NTASKS=2
        srun "$PY" -c "$CODE" nodelist
        first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
        export MASTER_ADDR=$(scontrol show node "$first" | grep -oP 'NodeAddr=\\K\\S+')
        srun "$PY" -c "$CODE" nodeaddr
        "$PY" -m reformer_dist.cli.launch hostfile --out {tmp_path}/hostfile
        """)
    )
    log = tmp_path / "smoke.out"
    rc, job = slurm_cluster.sbatch_wait(script, ["--output", str(log)], cwd=tmp_path)
    assert rc == 0, f"job failed ({rc}): {slurm_cluster.job_info(job)}\n{_log(log)}"
    rows: dict[str, list[tuple[str, dict]]] = {}
    for line in _log(log).splitlines():
        if line.startswith("DISCOVER "):
            _, tag, node, payload = line.split(" ", 3)
            rows.setdefault(tag, []).append((node, json.loads(payload)))
    assert set(rows) == {"batch", "nodelist", "nodeaddr"}, _log(log)

    ((_, batch),) = rows["batch"]
    assert (batch["source"], batch["rank"], batch["world_size"]) == ("single", 0, 1)

    job_id = int(job)
    for tag, master in (("nodelist", "node1"), ("nodeaddr", "127.0.0.1")):
        got = sorted(rows[tag], key=lambda r: r[1]["rank"])
        assert [r["rank"] for _, r in got] == [0, 1], got
        assert [node for node, _ in got] == ["node1", "node2"], got
        for _, r in got:
            assert (r["world_size"], r["local_rank"], r["local_world_size"], r["source"]) == (2, 0, 1, "slurm")
            assert r["master_addr"] == master
            assert r["master_port"] == 29500 + job_id % 1000
    assert (tmp_path / "hostfile").read_text() == "node1 slots=1\nnode2 slots=1\n"


def test_train_sbatch_preempt_requeue_resume(slurm_cluster, repo_root: Path, tmp_path: Path) -> None:
    """launch/slurm/train.sbatch: USR1 (as --signal=B:USR1 sends it) -> checkpoint -> requeue -> resume."""
    (tmp_path / "stub_train.py").write_text(STUB_TRAINER)
    out = tmp_path / "run"
    out.mkdir()
    log = tmp_path / "train.out"
    env = {
        "REFORMER_TRAIN_MODULE": "stub_train",
        "PYTHONPATH": str(tmp_path),
        "PYTHON": sys.executable,
        "CONFIG": "configs/quickstart.toml",
    }
    job = slurm_cluster.sbatch(
        repo_root / "launch/slurm/train.sbatch",
        [*LOCAL_JOB_ARGS, "--job-name=rd-preempt", f"--output={log}"],
        script_args=["--out", str(out), "--requeue"],
        cwd=repo_root,
        extra_env=env,
    )
    deadline = time.monotonic() + CEILING_S
    while not (out / "running-0").exists():
        info = slurm_cluster.job_info(job)
        if time.monotonic() > deadline or info.get("JobState") in ("FAILED", "COMPLETED", "CANCELLED"):
            slurm_cluster.run(["scancel", job])
            pytest.fail(f"stub trainer never started: {info}\n{_log(log)}")
        time.sleep(0.1)
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
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{text}"
    assert info.get("ExitCode") == "0:0", f"{info}\n{text}"

    # the batch script forwarded the signal, and the requeued run appended to the same log
    assert "got SIGUSR1: forwarding to the ranks" in text, text
    assert "restart=0 " in text and "restart=1 " in text, text
    assert "master=127.0.0.1:" in text, text

    runs = {r: _events(out, r) for r in (0, 1)}
    stops = []
    for rank, ev in runs.items():
        kinds = [e["event"] for e in ev]
        expected = ["start", "resumed", "preempted"] + (["requeue"] if rank == 0 else []) + ["start", "resumed", "done"]
        assert kinds == expected, (rank, ev, text)
        first, second = ev[0], ev[len(expected) - 3]
        for start, restart in ((first, 0), (second, 1)):
            got = (start["world_size"], start["source"], start["restart"], start["rank"])
            assert got == (2, "slurm", restart, rank)
            assert (start["config"], start["resume"], start["allreduce"]) == ("configs/quickstart.toml", "auto", 3.0)
        preempted = ev[2]
        assert preempted["signal"] == "SIGUSR1"
        resumed = ev[len(expected) - 2]
        assert resumed["step"] == preempted["step"], ev  # resumed from its own checkpoint
        assert ev[-1]["step"] == preempted["step"] + 20
        stops.append(preempted["step"])
    assert stops[0] == stops[1], f"ranks stopped at different steps: {stops}"
    assert runs[0][3] == {"event": "requeue", "ok": True}
    assert {runs[0][0]["node"], runs[1][0]["node"]} == {"node1", "node2"}


def test_train_deepspeed_sbatch(slurm_cluster, repo_root: Path, tmp_path: Path) -> None:
    """launch/slurm/train_deepspeed.sbatch: hostfile + deepspeed --launcher slurm -> 2 ranks."""
    (tmp_path / "stub_train.py").write_text(STUB_TRAINER)
    out = tmp_path / "run"
    out.mkdir()
    log = tmp_path / "ds.out"
    env = {
        "REFORMER_TRAIN_MODULE": "stub_train",
        "PYTHONPATH": str(tmp_path),
        "PYTHON": sys.executable,
        "HOSTFILE": str(tmp_path / "hostfile"),
    }
    rc, job = slurm_cluster.sbatch_wait(
        repo_root / "launch/slurm/train_deepspeed.sbatch",
        [*LOCAL_JOB_ARGS, "--job-name=rd-ds", f"--output={log}"],
        script_args=["--out", str(out), "--mode", "report"],
        cwd=repo_root,
        extra_env=env,
    )
    text = _log(log)
    assert rc == 0, f"job failed ({rc}): {slurm_cluster.job_info(job)}\n{text}"
    assert (tmp_path / "hostfile").read_text() == "node1 slots=1\nnode2 slots=1\n"
    starts = [_events(out, r)[0] for r in (0, 1)]
    assert [s["rank"] for s in starts] == [0, 1]
    for s in starts:
        assert (s["world_size"], s["source"], s["master"], s["allreduce"]) == (2, "slurm", "127.0.0.1", 3.0), s
    assert {s["node"] for s in starts} == {"node1", "node2"}
