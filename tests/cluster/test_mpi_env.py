"""`mpiexec -n 2` (the venv's MPICH): discover() through mpi4py, then gloo over export_env()."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.slurm_cluster import CEILING_S

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

PROBE = r"""
import json, os, signal, sys, time

import torch
import torch.distributed as dist

from reformer_dist.parallel.env import discover, export_env
from reformer_dist.training.preemption import PreemptionHandler

env = discover()
export_env(env)
dist.init_process_group("gloo")  # env:// from the variables export_env() set
value = torch.tensor([float(env.rank + 1)])
dist.all_reduce(value)

# Only rank 1 is signalled (at step 3); sync() must stop both ranks at that same step.
handler = PreemptionHandler().install()
stop = None
for step in range(1, 200):
    if env.rank == 1 and step == 3:
        os.kill(os.getpid(), signal.SIGUSR1)
    if handler.sync():
        stop = step
        break
# one file per rank: two ranks printing to mpiexec's shared stdout can interleave within a line
from pathlib import Path
Path(f"result{env.rank}.json").write_text(json.dumps({
    "env": json.loads(env.to_json()), "sum": value.item(), "stop": stop, "local_flag": handler.requested,
    "torch_rank": dist.get_rank(), "torch_world": dist.get_world_size()}))
dist.destroy_process_group()
"""


def test_mpiexec_two_ranks(venv_mpiexec: Path, tmp_path: Path) -> None:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "PMI_", "OMPI_"))}
    try:
        res = subprocess.run(
            [str(venv_mpiexec), "-n", "2", sys.executable, str(script)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=CEILING_S,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"mpiexec -n 2 hung: {exc.stdout!r} {exc.stderr!r}")
    rows = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("result*.json"))]
    assert res.returncode == 0 and len(rows) == 2, f"rc={res.returncode}\n{res.stdout}\n{res.stderr}"
    rows.sort(key=lambda r: r["env"]["rank"])
    assert [r["env"]["rank"] for r in rows] == [0, 1]
    assert [r["torch_rank"] for r in rows] == [0, 1]
    for r in rows:
        e = r["env"]
        assert (e["source"], e["world_size"], e["local_world_size"], r["torch_world"]) == ("mpi", 2, 2, 2)
        assert e["local_rank"] == e["rank"]
        assert r["sum"] == 3.0  # 1 + 2 over gloo
        assert r["stop"] == 3, rows  # both ranks stop at the step where rank 1 was signalled
    assert rows[0]["env"]["master_addr"] == rows[1]["env"]["master_addr"]
    assert rows[0]["env"]["master_port"] == rows[1]["env"]["master_port"]  # chosen by rank 0, broadcast
    assert [r["local_flag"] for r in rows] == [False, True]
