"""Launch `reformer-train` as N real processes (torchrun / deepspeed launcher / plain python) and read
what each rank wrote.

Tests judge runs by the per-rank result files (`logging.rank_files = true` -> <run>/ranks/rankR.jsonl),
not by exit codes: gloo ranks sometimes abort at interpreter exit after all work is done.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A model small enough that a 2-rank step takes milliseconds; both attention kinds, reversible, no dropout.
TINY = [
    "model.vocab_size=257",
    "model.d_model=32",
    "model.n_heads=2",
    "model.d_head=16",
    "model.d_ff=64",
    "model.n_layers=2",
    'model.attn_layers=["lsh","local"]',
    "model.chunk_len=8",
    "model.n_hashes=2",
    "model.axial_pos_shape=[8,8]",
    "model.reversible=true",
    "model.dropout=0.0",
    "data.path=builtin",
    "data.seq_len=32",
    "train.micro_batch=1",
    "train.lr=3e-3",
    "train.warmup_steps=1",
    "train.grad_clip=1.0",
    "eval.every=0",
    "eval.at_end=false",
    "checkpoint.every=0",
    "checkpoint.at_end=false",
    "logging.tensorboard=false",
    "logging.progress_bar=false",
    "logging.rank_files=true",
    "output.save_model=false",
    "output.sample_tokens=0",
    "deepspeed.precision=fp32",
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        and not k.startswith(("SLURM_", "PMI_", "OMPI_"))
    }
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))  # shm_comm op built once
    env["OMP_NUM_THREADS"] = "1"  # ranks share 2 cores
    # the venv's tools first, as `make test` does: one ninja for any JIT op build (see training/native_ops.py)
    venv_bin = str(Path(sys.executable).parent)
    rest = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin]
    env["PATH"] = os.pathsep.join([venv_bin] + rest)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@dataclass
class Run:
    out_dir: Path
    returncode: int
    output: str

    def records(self, rank: int, event: str | None = None) -> list[dict]:
        p = self.out_dir / "ranks" / f"rank{rank}.jsonl"
        if not p.is_file():
            raise AssertionError(
                f"rank {rank} wrote no result file {p}; exit code {self.returncode}; "
                f"output tail:\n{self.output[-4000:]}"
            )
        recs = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        return [r for r in recs if event is None or r.get("event") == event]

    def losses(self, rank: int = 0) -> dict[int, float]:
        """step -> global mean loss, as this rank saw it (the last record per step wins after a resume)."""
        return {r["step"]: r["loss"] for r in self.records(rank, "step")}


def launch(
    nprocs: int,
    out_dir: Path,
    overrides: list[str],
    launcher: str = "torchrun",
    extra_args: list[str] = (),
    timeout: float = 600,
    script: Path | None = None,
    env: dict[str, str] | None = None,
) -> Run:
    """Run reformer-train with TINY + overrides on `nprocs` ranks, writing to `out_dir`.

    `script`: a Python file to run instead of the reformer_dist.cli.train module (a test driver that
    patches something, then calls its main()); `env`: extra environment variables.
    """
    args = ["--set", f"output.dir={out_dir}"]
    for o in TINY + list(overrides):
        args += ["--set", o]
    args += list(extra_args)
    target = ["-m", "reformer_dist.cli.train"] if script is None else [str(script)]
    if launcher == "python":
        assert nprocs == 1
        cmd = [sys.executable, *target, *args]
    elif launcher == "torchrun":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nprocs}",
            f"--master_port={free_port()}",
            *target,
            *args,
        ]
    elif launcher == "deepspeed":
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            f"--num_gpus={nprocs}",
            f"--master_port={free_port()}",
            *(["--module"] if script is None else []),
            *target[-1:],
            *args,
        ]
    else:
        raise ValueError(launcher)
    try:
        p = subprocess.run(
            cmd, cwd=REPO, env={**clean_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout
        )
        return Run(out_dir, p.returncode, p.stdout + p.stderr)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return Run(out_dir, -9, out + "\n[timed out]")
