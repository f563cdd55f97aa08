"""Checkpoint layout, per-rank trainer state, the atomic commit and `--resume` resolution.

Layout of the checkpoint root (default <output.dir>/checkpoints):

    latest                      tag of the newest COMPLETE checkpoint (DeepSpeed's format; moved last)
    step_00000300/              one checkpoint ("tag")
        mp_rank_00_model_states.pt, *_optim_states.pt   DeepSpeed's files (engine.save_checkpoint)
        trainer_state/rank00000.pt                       per rank: step, loader state, RNG states
        run_config.json                                  the resolved run config + batch plan
        MANIFEST.json                                    checksums; written by rank 0 after a barrier

The DeepSpeed calls and barriers live in trainer.py; everything here is plain file handling, so
it is testable without a process group. Folders must be on a file system every rank sees.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reformer_dist.config_schema import Section, boolean, int_min, opt, optional, string
from reformer_dist.ondisk import (LATEST, LATEST_UNIVERSAL, MANIFEST, RUN_CONFIG, TRAINER_STATE_DIR, CheckpointError,
                                  AtomicFile, atomic_write, is_complete, rank_state_file, step_of, verify_manifest,
                                  write_manifest)


@dataclass
class CheckpointConfig(Section):
    every: int = opt(500, int_min(0), "save every N steps (0 = only at the end)")
    keep_last: int = opt(3, int_min(1), "complete checkpoints kept; older ones are deleted after a new one completes")
    at_end: bool = opt(True, boolean, "save after the last step")
    dir: str | None = opt(None, optional(string), "checkpoint root (default <output.dir>/checkpoints)")

# ---------------------------------------------------------------------------------------------- RNG
def capture_rng() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------- per-rank state
def state_path(ckpt_dir: Path, rank: int) -> Path:
    return ckpt_dir / rank_state_file(rank)


def save_rank_state(ckpt_dir: Path, rank: int, state: dict[str, Any]) -> None:
    p = state_path(ckpt_dir, rank)
    p.parent.mkdir(parents=True, exist_ok=True)
    with AtomicFile(p) as f:
        torch.save(state, f)


def load_rank_state(ckpt_dir: Path, rank: int) -> dict[str, Any]:
    p = state_path(ckpt_dir, rank)
    if not p.is_file():
        n = len(list((ckpt_dir / TRAINER_STATE_DIR).glob("rank*.pt")))
        raise CheckpointError(f"{p}: missing; the checkpoint holds trainer state for {n} rank(s) "
                              f"(exact resume needs the same world size)")
    try:
        # our own file, checksum-verified before loading; it holds numpy RNG tuples, hence weights_only=False
        return torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"{p}: cannot be read ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------- commit / prune
def list_tags(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint folder under root, newest first (complete or not)."""
    if not root.is_dir():
        return []
    found = [(step_of(p.name), p) for p in root.iterdir() if p.is_dir()]
    return sorted(((s, p) for s, p in found if s is not None), reverse=True)


def commit(root: Path, tag: str, extra: dict | None = None) -> None:
    """Rank 0, after every rank saved: manifest first, then move `latest` (temp + rename)."""
    write_manifest(root / tag, extra=extra)
    atomic_write(root / LATEST, tag)


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last`, and incomplete ones older than the newest
    complete one (leftovers of interrupted saves). Call only after a new checkpoint is committed."""
    tags = list_tags(root)
    complete = [p for _, p in tags if is_complete(p)]
    if not complete:
        return []
    newest_step = step_of(complete[0].name)
    doomed = complete[keep_last:] + [p for s, p in tags if not is_complete(p) and s < newest_step]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def _no_space(e: BaseException | None) -> bool:
    """Whether a save failed for lack of space: ENOSPC/EDQUOT anywhere in the chain, or torch's short-write error."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "unexpected pos" in str(e) or "No space left" in str(e):  # torch's PyTorchStreamWriter
            return True
        e = e.__cause__ or e.__context__
    return False


def save_failure_message(path: Path, failure: BaseException | None, rank: int) -> str:
    """What a failed checkpoint save tells the user: the folder, the cause, what was kept, what to do."""
    root = path.parent
    latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    kept = (f"the previous checkpoint {root / latest} is intact and `latest` still names it" if latest
            else "there is no earlier checkpoint")
    if failure is None:
        cause = "another rank's write failed"
    elif _no_space(failure):
        try:
            free = shutil.disk_usage(root).free
            cause = f"no space left on device ({free / 2**20:.1f} MiB free on that file system)"
        except OSError:
            cause = "no space left on device"
    else:
        cause = f"{type(failure).__name__}: {failure}"
    return (f"{path}: checkpoint save failed on rank {rank}: {cause}. The partial checkpoint was removed; {kept}. "
            "Free space (or set checkpoint.dir elsewhere), then run again with --resume auto")


# ---------------------------------------------------------------------------------------------- resume
@dataclass
class ResumePoint:
    root: Path
    tag: str
    step: int
    skipped_incomplete: list[str]

    @property
    def path(self) -> Path:
        return self.root / self.tag


def precheck_resume_path(spec: str) -> str | None:
    """Cheap look at `--resume PATH` before any process group starts: None when it may hold a checkpoint."""
    p = Path(spec)
    if not p.exists():
        return f"--resume {spec}: no such file or folder"
    if not p.is_dir():
        return f"--resume {spec}: is a file; expected a checkpoint folder (step_XXXXXXXX), its root, or a reshard output"
    if step_of(p.name) is None and not (p / LATEST_UNIVERSAL).is_file() and not list_tags(p):
        return (f"--resume {spec}: no checkpoint in this folder (expected step_XXXXXXXX folders, e.g. "
                f"<output.dir>/checkpoints, or a `reformer-ckpt reshard` output)")
    return None


def find_resume(spec: str, default_root: Path, verify_hashes: bool = True) -> ResumePoint | None:
    """Resolve `--resume auto|PATH` to a verified checkpoint; None = start fresh (only for `auto`).

    `auto`: the newest COMPLETE checkpoint under the run's checkpoint root (none -> fresh start).
    PATH: a checkpoint folder (step_XXXXXXXX) or a checkpoint root (its newest complete one).
    A complete checkpoint whose files do not match its manifest raises CheckpointError naming the file;
    it is never silently replaced by an older one.
    """
    if spec == "auto":
        root, required = default_root, False
    else:
        p = Path(spec)
        if not p.exists():
            raise CheckpointError(f"--resume {spec}: no such file or folder")
        if step_of(p.name) is not None and p.is_dir():
            if not is_complete(p):
                raise CheckpointError(f"{p}: incomplete checkpoint (no {MANIFEST}; the save did not finish)")
            verify_manifest(p, hashes=verify_hashes)
            return ResumePoint(p.parent, p.name, step_of(p.name), [])  # type: ignore[arg-type]
        root, required = p, True
    skipped: list[str] = []
    for step, p in list_tags(root):
        if not is_complete(p):
            skipped.append(p.name)
            continue
        verify_manifest(p, hashes=verify_hashes)
        return ResumePoint(root, p.name, step, skipped)
    if required:
        raise CheckpointError(f"--resume {spec}: no complete checkpoint (step_XXXXXXXX with {MANIFEST}) in {root}")
    return None


def read_run_config(ckpt_dir: Path) -> dict[str, Any]:
    p = ckpt_dir / RUN_CONFIG
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: cannot be read ({e})") from None


def compare_run_configs(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(errors, warnings) between a checkpoint's run config and the current one, as dotted keys.

    The model must match (the weights mean something else otherwise) and so must the data-parallel
    layout (per-rank loader states). Other differences are allowed (e.g. a longer max_steps) but
    reported, because they break the "same losses as an uninterrupted run" guarantee.
    """
    errors, warnings = [], []
    harmless = {"train.max_steps", "checkpoint.every", "checkpoint.keep_last", "checkpoint.at_end", "checkpoint.dir",
                "eval.every", "eval.at_end", "logging.log_every", "logging.tensorboard", "logging.progress_bar",
                "logging.rank_files", "output.dir", "output.save_model", "output.sample_tokens", "output.sample_prompt",
                "output.sample_temperature", "output.sample_top_k", "train.requeue", "deepspeed.config"}
    for section, body in current["config"].items():
        old = saved["config"].get(section, {})
        for key, value in body.items():
            if old.get(key, value) != value:
                dotted = f"{section}.{key}"
                msg = f"{dotted}: checkpoint has {old.get(key)!r}, this run {value!r}"
                if section == "model":
                    errors.append(msg)
                elif dotted not in harmless:
                    warnings.append(msg)
    for key in ("dp_size", "sp_size", "micro_batch", "grad_accum"):
        if saved["plan"].get(key, 1 if key == "sp_size" else None) != current["plan"].get(key):
            errors.append(f"batch plan {key}: checkpoint has {saved['plan'].get(key)}, this run {current['plan'].get(key)} "
                          f"(exact resume needs the same data- and sequence-parallel sizes, micro batch and grad "
                          f"accumulation)")
    return errors, warnings
