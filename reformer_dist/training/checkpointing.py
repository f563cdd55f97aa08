"""Saving checkpoints: the collective save, per-rank trainer state, RNG state, the atomic commit, pruning.

Layout of the checkpoint root (default <output.dir>/checkpoints; names in reformer_dist/ondisk.py):

    latest                      tag of the newest COMPLETE checkpoint (DeepSpeed's format; moved last)
    zero_to_safetensors.py      tools/zero_to_safetensors.py: ZeRO shards -> model.safetensors, needs
                                only torch + safetensors (copied like DeepSpeed's zero_to_fp32.py)
    step_00000300/              one checkpoint ("tag")
        mp_rank_00_model_states.pt, *_optim_states.pt   DeepSpeed's files (engine.save_checkpoint)
        trainer_state/rank00000.pt                       per rank: step, loader state, RNG states
        run_config.json                                  the resolved run config + batch plan
        MANIFEST.json                                    the manifest; written by rank 0 after a barrier

`save_checkpoint` is the collective every rank calls (it uses the engine's own save); the rest is
plain file handling, testable without a process group. Reading a checkpoint back is
training/resume.py. Folders must be on a file system every rank sees.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from reformer_dist.config_schema import Section, boolean, int_min, opt, optional, string
from reformer_dist.ondisk import (
    LATEST,
    RUN_CONFIG,
    TRAINER_STATE_DIR,
    ZERO_TO_SAFETENSORS,
    AtomicFile,
    CheckpointError,
    atomic_write,
    is_complete,
    rank_state_file,
    step_of,
    tag_for,
    write_manifest,
)
from reformer_dist.parallel.collectives import any_rank, barrier
from reformer_dist.training.engine import Engine
from reformer_dist.training.metrics import Metrics
from reformer_dist.training.seeding import capture_rng, restore_rng
from reformer_dist.training.train_state import TrainState

log = logging.getLogger(__name__)

# The standalone consolidation script copied next to every checkpoint (a source checkout's tools/ folder).
RECOVERY_SCRIPT = Path(__file__).resolve().parents[2] / "tools" / ZERO_TO_SAFETENSORS


class Stateful(Protocol):
    """What a checkpoint saves and restores of a component (the window loader)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class CheckpointConfig(Section):
    every: int = opt(500, int_min(0), "save every N steps (0 = only at the end)")
    keep_last: int = opt(3, int_min(1), "complete checkpoints kept; older ones are deleted after a new one completes")
    at_end: bool = opt(True, boolean, "save after the last step")
    dir: str | None = opt(None, optional(string), "checkpoint root (default <output.dir>/checkpoints)")


# ---------------------------------------------------------------------------------------------- per-rank state
def state_path(ckpt_dir: Path, rank: int) -> Path:
    """Rank `rank`'s trainer-state file in checkpoint folder `ckpt_dir`."""
    return ckpt_dir / rank_state_file(rank)


def rank_state(train: TrainState, loader: Stateful, world_size: int) -> dict[str, Any]:
    """What one rank's trainer-state file holds: the `TrainState` fields at the top level (the format every
    earlier checkpoint has), the world size it was saved with, the loader's position and the RNG streams."""
    return {**train.state_dict(), "world_size": world_size, "loader": loader.state_dict(), "rng": capture_rng()}


def saved_world_size(state: dict[str, Any]) -> int | None:
    """The world size a trainer-state file was saved with."""
    return state.get("world_size")


def restore_rank_state(state: dict[str, Any], train: TrainState, loader: Stateful, rng: bool = True) -> None:
    """Fill `train` and `loader` from a trainer-state file; `rng`: put this rank's saved streams back too (not
    for a universal checkpoint, whose streams belong to another world size)."""
    train.load_state_dict(state)
    loader.load_state_dict(state["loader"])
    if rng:
        restore_rng(state["rng"])


def save_rank_state(ckpt_dir: Path, rank: int, state: dict[str, Any]) -> None:
    p = state_path(ckpt_dir, rank)
    p.parent.mkdir(parents=True, exist_ok=True)
    with AtomicFile(p) as f:
        torch.save(state, f)


def load_rank_state(ckpt_dir: Path, rank: int) -> dict[str, Any]:
    p = state_path(ckpt_dir, rank)
    if not p.is_file():
        n = len(list((ckpt_dir / TRAINER_STATE_DIR).glob("rank*.pt")))
        raise CheckpointError(
            f"{p}: missing; the checkpoint holds trainer state for {n} rank(s) (exact resume needs the same world size)"
        )
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


def prune(root: Path, keep_last: int, newest_tested: bool = False) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last`, and incomplete ones older than the newest
    complete one (leftovers of interrupted saves). Call only after a new checkpoint is committed.

    Until a later step's loss comes out finite (`newest_tested`), the newest checkpoint's weights are untested
    and may be the ones a divergence starts from: the one before it is kept too, so that rotation never
    removes the last checkpoint known to give a finite loss."""
    tags = list_tags(root)
    complete = [(s, p) for s, p in tags if is_complete(p)]
    if not complete:
        return []
    newest_step = complete[0][0]
    keep = max(keep_last, 1 if newest_tested else 2)
    doomed = [p for _, p in complete[keep:]] + [p for s, p in tags if not is_complete(p) and s < newest_step]
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
    kept = (
        f"the previous checkpoint {root / latest} is intact and `latest` still names it"
        if latest
        else "there is no earlier checkpoint"
    )
    todo = "Free space (or set checkpoint.dir elsewhere)"
    if failure is None:
        cause, todo = "another rank's write failed", "See that rank's message"
    elif _no_space(failure):
        try:
            free = shutil.disk_usage(root).free
            cause = f"no space left on device ({free / 2**20:.1f} MiB free on that file system)"
        except OSError:
            cause = "no space left on device"
    else:  # not a full disk: do not send the user to free space
        cause, todo = f"{type(failure).__name__}: {failure}", "Fix that cause"
    return (
        f"{path}: checkpoint save failed on rank {rank}: {cause}. The partial checkpoint was removed; {kept}. "
        f"{todo}, then run again with --resume auto"
    )


# ---------------------------------------------------------------------------------------------- the save
def save_checkpoint(
    engine: Engine,
    root: Path,
    step: int,
    rank: int,
    world_size: int,
    trainer_state: dict[str, Any],
    run_record: dict[str, Any],
    keep_last: int,
    loss: float | None = None,
) -> list[Path]:
    """Save checkpoint `step` under `root`; every rank calls this at the same step. Returns (on rank 0) the
    checkpoints pruned after it.

    DeepSpeed's files and each rank's trainer state (and rank 0's run config), then a barrier; rank 0
    writes the manifest and moves `latest` (`commit`), prunes, and copies the recovery script. A failed
    write on any rank (a full disk) removes the partial folder on every rank's behalf and raises
    CheckpointError naming it and the cause; `latest` and the previous checkpoint stay. `loss`: the step's
    mean loss, recorded in the manifest (the trainer saves only steps whose loss was finite).
    """
    main = rank == 0
    tag = tag_for(step)
    path = root / tag
    if main and path.exists():
        shutil.rmtree(path)  # a stale folder of an abandoned continuation: never mix files
    barrier()
    failure: BaseException | None = None
    try:
        engine.save_checkpoint(str(root), tag=tag, save_latest=False, client_state={"reformer_dist_step": step})
        save_rank_state(path, rank, trainer_state)
        if main:
            atomic_write(path / RUN_CONFIG, json.dumps(run_record, indent=2) + "\n")
    except (OSError, RuntimeError) as e:  # torch reports a short write as RuntimeError("... unexpected pos ...")
        failure = e
    _agree_saved(path, failure, rank)  # collective: every rank's files are on disk, or all raise
    if main:
        try:
            commit(root, tag, extra={"step": step, "world_size": world_size, "loss": loss})
        except OSError as e:
            failure = e
    _agree_saved(path, failure if main else None, rank)
    removed = []
    if main:
        removed = prune(root, keep_last)
        copy_recovery_script(root)
    barrier()  # nobody runs ahead (or exits) before `latest` moved
    return removed


def _agree_saved(path: Path, failure: BaseException | None, rank: int) -> None:
    """All ranks agree whether a save step failed anywhere; if so the partial folder goes and all raise."""
    if not any_rank(failure is not None):
        return
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
    barrier()
    raise CheckpointError(save_failure_message(path, failure, rank))


def copy_recovery_script(root: Path) -> None:
    """Put tools/zero_to_safetensors.py next to the checkpoints, as DeepSpeed does with zero_to_fp32.py."""
    if not RECOVERY_SCRIPT.is_file():  # a package installed without the source tree's tools/ folder
        return
    try:
        dst = root / ZERO_TO_SAFETENSORS
        shutil.copyfile(RECOVERY_SCRIPT, dst)
        os.chmod(dst, os.stat(dst).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    except OSError as e:  # the checkpoint itself is complete: say so, do not fail the run
        log.warning(f"could not copy {RECOVERY_SCRIPT.name} to {root}: {e}")


# ---------------------------------------------------------------------------------------------- the trainer's side
class Checkpointer:
    """When the trainer's checkpoints are written, and which are kept while a divergence is possible.

    A step whose loss was not finite is never saved (its weights are those of an earlier step, with a later
    loader position). Until a later step's loss comes out finite, the newest checkpoint's weights are
    untested: with `keep_last = 1` pruning keeps the one before it too (`tested` drops it)."""

    def __init__(
        self,
        engine: Engine,
        root: Path,
        rank: int,
        world_size: int,
        keep_last: int,
        run_record: dict[str, Any],
        saved_step: int = -1,
    ):
        self.engine, self.root, self.rank, self.world_size = engine, root, rank, world_size
        self.keep_last, self.run_record = keep_last, run_record
        self.saved_step = saved_step  # the step the newest checkpoint of this run holds (-1: none)
        self.spare_pending = False  # an older checkpoint kept until the newest one gives a finite loss

    def save(self, train: TrainState, loader: Stateful, loss: float | None, metrics: Metrics) -> bool:
        """Checkpoint this step (collective; once per step): see `save_checkpoint`. Returns False (and says
        so) when the step's loss was not finite."""
        if self.saved_step == train.step:
            return True
        if train.nonfinite_streak:
            log.info(f"step {train.step}: no checkpoint: its loss was not finite; {self.latest_note()}")
            return False
        t0 = time.time()
        removed = save_checkpoint(
            self.engine,
            self.root,
            train.step,
            self.rank,
            self.world_size,
            rank_state(train, loader, self.world_size),
            self.run_record,
            self.keep_last,
            loss=loss,
        )
        self.spare_pending = self.keep_last == 1
        if self.rank == 0:
            metrics.event(
                "checkpoint",
                step=train.step,
                path=str(self.root / tag_for(train.step)),
                seconds=round(time.time() - t0, 3),
                removed=[p.name for p in removed],
            )
        self.saved_step = train.step
        return True

    def tested(self) -> None:
        """A step after the newest checkpoint gave a finite loss: the older one kept for safety may go."""
        if not self.spare_pending:
            return
        self.spare_pending = False
        if self.rank == 0:
            prune(self.root, self.keep_last, newest_tested=True)

    def latest_note(self) -> str:
        """Which checkpoint `latest` names, for messages about a step that was not saved."""
        latest = self.root / LATEST
        name = latest.read_text().strip() if latest.is_file() else None
        return f"`latest` names {self.root / name}" if name else "there is no earlier checkpoint"
