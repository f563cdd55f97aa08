"""DeepSpeed's JIT-compiled C++ ops: build only what training uses, build it once, and say so when building.

Why the `deepspeed_shm_comm` op used to be rebuilt again and again (issue #15): torch compiles JIT ops
with `ninja` found on PATH. A venv holds two: pip's `ninja` 1.13 (a deepspeed dependency, in
`.venv/bin`) and the system's (`/usr/bin/ninja`, 1.11 here). Processes started with the venv on PATH
(`source .venv/bin/activate`, `launch/mpirun.sh`, the sbatch scripts) use the first, processes started
as `.venv/bin/reformer-train` or `.venv/bin/python -m pytest` (`make quickstart`, `make test`) the
second. Each version rejects the other's `.ninja_log` ("v7" vs "v5": "starting over"), so every switch
recompiled both objects. The fix has two parts:

- `skip_unused_ops`: the trainer does not build `deepspeed_shm_comm` at all. `deepspeed.init_distributed`
  builds it whenever the CPU accelerator is active, but it only serves DeepSpeed's `inference_all_reduce`
  (tensor-parallel inference kernels); training's collectives go through torch.distributed (gloo/NCCL).
- `prefer_interpreter_ninja`: an op that is needed (DeepSpeedCPUAdam under optimizer offload) is built
  by the `ninja` installed next to this interpreter whatever PATH says, so every process agrees and
  the cached build in TORCH_EXTENSIONS_DIR is reused.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path

import torch
from torch.utils.cpp_extension import get_default_build_root

log = logging.getLogger(__name__)

SHM_COMM = "deepspeed_shm_comm"


def skip_unused_ops() -> None:
    """Stop DeepSpeed from JIT-building ops that training never calls (today: `deepspeed_shm_comm`).

    Call before `deepspeed.init_distributed` / `deepspeed.initialize`. DeepSpeed consults
    `deepspeed.ops.__compatible_ops__` before building the op and skips it when marked incompatible
    (the same path a non-Linux machine takes), falling back to torch.distributed for everything.
    """
    # deepspeed logs its accelerator choice when imported; cli/train.py imports this module at the top,
    # and a config error or a dry run must not print that
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM] = False


def prefer_interpreter_ninja(environ: MutableMapping[str, str] | None = None) -> bool:
    """Put the folder of this interpreter first on PATH when it holds `ninja` (pip's, in a venv).

    Returns True when PATH changed. One ninja version for every process keeps a JIT build valid
    across processes (two versions discard each other's build log and recompile everything).
    """
    environ = os.environ if environ is None else environ  # looked up now: os.environ may have been replaced
    bindir = str(Path(sys.executable).parent)
    if not os.access(os.path.join(bindir, "ninja"), os.X_OK):
        return False
    parts = [p for p in environ.get("PATH", "").split(os.pathsep) if p]
    if parts and parts[0] == bindir:
        return False
    environ["PATH"] = os.pathsep.join([bindir] + [p for p in parts if p != bindir])
    return True


def extensions_dir() -> Path:
    """Where torch keeps JIT-built ops: $TORCH_EXTENSIONS_DIR, else torch's per-user default."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    accel = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    return Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}_{accel}"


def is_built(op_name: str) -> bool:
    """Whether a JIT build of `op_name` already exists (torch reuses it if its sources did not change)."""
    return (extensions_dir() / op_name / f"{op_name}.so").is_file()


def announce_build(op_name: str, why: str, stale_after_s: float = 900.0) -> bool:
    """Print one line before a JIT build that is about to happen (minutes of silence otherwise).

    Returns True when a build is expected (no cached build of `op_name`). Also warns about a build
    `lock` older than `stale_after_s`: torch waits for it forever, and a killed build leaves it behind.
    """
    lock = extensions_dir() / op_name / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        age = 0.0
    if age > stale_after_s:
        log.warning(
            f"{lock} is {age / 60:.0f} min old; torch waits for it before using {op_name}. If no build is "
            "running (a killed build leaves it behind), delete it"
        )
    if is_built(op_name):
        return False
    log.info(
        f"building DeepSpeed's C++ op {op_name} ({why}) into {extensions_dir() / op_name}: a one-time compile, "
        "1-4 min on a small CPU; later runs reuse it"
    )
    return True
