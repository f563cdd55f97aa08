"""Run ckpt_worker.py under torchrun and read what the ranks wrote; 2-rank saves are made once per session.

`saved(stage, offload)` is cached at module level so test_consolidate.py and test_reshard.py share one
2-rank ZeRO-2 save (~15 s each on 2 cores) when they run in the same pytest process.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.distributed.train_launcher import REPO, clean_env, free_port

WORKER = Path(__file__).with_name("ckpt_worker.py")
_TMP = Path(tempfile.mkdtemp(prefix="reformer-ckpt-runs-"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


@dataclass
class WorkerRun:
    out: Path
    returncode: int
    output: str

    def result(self, rank: int) -> dict:
        p = self.out / f"result_rank{rank}.json"
        if not p.is_file():
            raise AssertionError(
                f"rank {rank} wrote no {p.name}; exit code {self.returncode}; output tail:\n{self.output[-4000:]}"
            )
        r = json.loads(p.read_text())
        r["losses"] = {int(k): v for k, v in r["losses"].items()}
        return r

    @property
    def root(self) -> Path:
        return self.out / "ckpt"


def run_worker(nprocs: int, args: list[str], out: Path, timeout: float = 600) -> WorkerRun:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nprocs}",
        f"--master_port={free_port()}",
        str(WORKER),
        *args,
        "--out",
        str(out),
    ]
    try:
        p = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout)
        return WorkerRun(out, p.returncode, p.stdout + p.stderr)
    except subprocess.TimeoutExpired as e:
        text = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return WorkerRun(out, -9, text + "\n[timed out]")


def saved(stage: int, offload: bool = False) -> WorkerRun:
    """2 gloo ranks, ZeRO-`stage`: 2 steps, checkpoint global_step2, 2 more steps (see ckpt_worker.py)."""
    return _saved(int(stage), bool(offload))


@functools.cache
def _saved(stage: int, offload: bool) -> WorkerRun:
    out = _TMP / f"zero{stage}{'_offload' if offload else ''}"
    return run_worker(2, ["save", "--stage", str(stage), *(["--offload"] if offload else [])], out)
