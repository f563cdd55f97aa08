"""The real trainer under `mpiexec -n 2` (the venv's MPICH): ranks come from mpi4py, not torch's variables.

`python -m reformer_dist.cli.train` with the TINY model, started with no RANK/WORLD_SIZE/MASTER_*
in the environment: discover() must find world size 2 through MPI, both ranks train the same
steps on different data shards (same all-reduced loss, different local losses), and the run ends
with an `end` event and a complete, checksum-verified checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reformer_dist.ondisk import verify_manifest
from tests.cluster.slurm_cluster import CEILING_S
from tests.distributed.train_launcher import TINY, clean_env

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

STEPS = 4


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_mpiexec_trains_two_ranks(venv_mpiexec: Path, repo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--config", "configs/quickstart.toml", "--set", f"output.dir={out}"]
    for o in TINY + [f"train.max_steps={STEPS}", "checkpoint.at_end=true"]:
        args += ["--set", o]
    env = clean_env()  # no RANK/WORLD_SIZE/MASTER_*/SLURM_*/PMI_*: ranks must come from mpi4py
    cmd = [str(venv_mpiexec), "-n", "2", sys.executable, "-m", "reformer_dist.cli.train", *args]
    t0 = time.monotonic()
    try:
        res = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=CEILING_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"mpiexec -n 2 reformer-train hung: {str(exc.stdout)[-3000:]}\n{str(exc.stderr)[-3000:]}")
    log = f"rc={res.returncode} after {time.monotonic() - t0:.1f}s\n{res.stdout[-3000:]}\n{res.stderr[-4000:]}"

    per_rank = {}
    for rank in (0, 1):
        path = out / "ranks" / f"rank{rank}.jsonl"
        assert path.is_file(), f"rank {rank} wrote no result file\n{log}"
        recs = _records(path)
        starts = [r for r in recs if r["event"] == "start"]
        assert len(starts) == 1, (recs, log)
        s = starts[0]
        assert (s["rank"], s["world_size"], s["launcher"], s["dp_size"]) == (rank, 2, "mpi", 2), s
        assert s["resume_step"] is None
        steps = [r for r in recs if r["event"] == "step"]
        assert [r["step"] for r in steps] == list(range(1, STEPS + 1)), (steps, log)
        ends = [r for r in recs if r["event"] == "end"]
        assert len(ends) == 1 and ends[0]["step"] == STEPS, (recs[-3:], log)
        per_rank[rank] = steps

    # a real 2-rank data-parallel run: the all-reduced loss agrees, the ranks' own batches differ
    assert [r["loss"] for r in per_rank[0]] == [r["loss"] for r in per_rank[1]]
    assert [r["local_loss"] for r in per_rank[0]] != [r["local_loss"] for r in per_rank[1]]

    # rank 0's metrics.jsonl: one start (mpi, world 2), steps 1..STEPS, a checkpoint, an end
    metrics = _records(out / "metrics.jsonl")
    assert [r["event"] for r in metrics if r["event"] != "step"] == ["start", "checkpoint", "end"], metrics
    assert (metrics[0]["world_size"], metrics[0]["launcher"]) == (2, "mpi")

    root = out / "checkpoints"
    tag = (root / "latest").read_text().strip()
    assert tag == f"step_{STEPS:08d}", log
    manifest = verify_manifest(root / tag)  # every file present with its size and SHA-256
    assert manifest["step"] == STEPS and manifest["world_size"] == 2
    assert {"trainer_state/rank00000.pt", "trainer_state/rank00001.pt"} <= set(manifest["files"])
    # judged by the result files above; the exit code must agree
    assert res.returncode == 0, log
