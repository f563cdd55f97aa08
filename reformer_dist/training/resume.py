"""Resume: which checkpoint a run continues from, whether it fits this run, and loading it; and what a
fresh start does with an earlier run's files.

    --resume auto    the newest COMPLETE checkpoint of this run's checkpoint root (none: start fresh)
    --resume PATH    a checkpoint folder (step_XXXXXXXX), a checkpoint root (its newest complete one), or a
                     universal checkpoint root (`reformer-ckpt reshard` output, `latest_universal`)

A normal checkpoint is verified against its manifest and resumes exactly: same world size, batch plan
and model (`compare_run_configs`), per-rank loader and RNG states. A universal one resumes on any world
size with the same global batch and sequence-parallel size: rank 0's loader position is global, so
every rank continues from it; per-rank RNG streams restart from seed + step (only dropout depends on
them). Resuming from an explicit older checkpoint moves the newer ones aside (`abandoned-<time>/`) so
that `--resume auto` never returns to them; a fresh start into a used run folder moves the earlier
run's files aside (`replaced-<time>/`, training/run_dir.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reformer_dist.ondisk import (
    ABANDONED_PREFIX,
    LATEST,
    LATEST_UNIVERSAL,
    MANIFEST,
    RUN_CONFIG,
    CheckpointError,
    aside_name,
    atomic_write,
    is_complete,
    step_of,
    tag_for,
    verify_manifest,
)
from reformer_dist.parallel.collectives import barrier, broadcast_object
from reformer_dist.training.checkpointing import (
    Stateful,
    list_tags,
    load_rank_state,
    restore_rank_state,
    saved_world_size,
    state_path,
)
from reformer_dist.training.config import BatchPlan, RunConfig
from reformer_dist.training.engine import Engine
from reformer_dist.training.seeding import rank_seed, seed_all
from reformer_dist.training.train_state import TrainState

log = logging.getLogger(__name__)

# Keys whose change does not alter the losses of the resumed steps (everything else is warned about).
HARMLESS = {
    "train.max_steps",
    "checkpoint.every",
    "checkpoint.keep_last",
    "checkpoint.at_end",
    "checkpoint.dir",
    "eval.every",
    "eval.at_end",
    "logging.log_every",
    "logging.tensorboard",
    "logging.progress_bar",
    "logging.rank_files",
    "output.dir",
    "output.save_model",
    "output.sample_tokens",
    "output.sample_prompt",
    "output.sample_temperature",
    "output.sample_top_k",
    "train.requeue",
    "deepspeed.config",
}


@dataclass
class ResumePoint:
    root: Path
    tag: str
    step: int
    skipped_incomplete: list[str]
    universal: bool = False  # a `reformer-ckpt reshard` output: loads on any world size

    @property
    def path(self) -> Path:
        return self.root / self.tag


# ---------------------------------------------------------------------------------------------- finding
def precheck_resume_path(spec: str) -> str | None:
    """Cheap look at `--resume PATH` before any process group starts: None when it may hold a checkpoint."""
    p = Path(spec)
    if not p.exists():
        return f"--resume {spec}: no such file or folder"
    if not p.is_dir():
        return (
            f"--resume {spec}: is a file; expected a checkpoint folder (step_XXXXXXXX), its root, or a reshard output"
        )
    if step_of(p.name) is None and not (p / LATEST_UNIVERSAL).is_file() and not list_tags(p):
        return (
            f"--resume {spec}: no checkpoint in this folder (expected step_XXXXXXXX folders, e.g. "
            f"<output.dir>/checkpoints, or a `reformer-ckpt reshard` output)"
        )
    return None


def find_resume(
    spec: str, default_root: Path, verify_hashes: bool = True, owner: Path | None = None
) -> ResumePoint | None:
    """Resolve `--resume auto|PATH` to a verified checkpoint; None = start fresh (only for `auto`).

    `auto`: the newest COMPLETE checkpoint under the run's checkpoint root (none -> fresh start).
    PATH: a checkpoint folder (step_XXXXXXXX) or a checkpoint root (its newest complete one).
    A complete checkpoint whose files do not match its manifest raises CheckpointError naming the file;
    it is never silently replaced by an older one. `owner`: this run's output.dir when checkpoint.dir is set
    explicitly: `auto` refuses a checkpoint another run (another output.dir) wrote there.
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
        if spec == "auto" and owner is not None:
            _check_owner(p, owner, root)
        verify_manifest(p, hashes=verify_hashes)
        return ResumePoint(root, p.name, step, skipped)
    if required:
        raise CheckpointError(f"--resume {spec}: no complete checkpoint (step_XXXXXXXX with {MANIFEST}) in {root}")
    return None


def _check_owner(ckpt: Path, owner: Path, root: Path) -> None:
    """CheckpointError when `ckpt` was written by a run with another output.dir than `owner`."""
    try:
        theirs = json.loads((ckpt / RUN_CONFIG).read_text())["config"]["output"]["dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no record of its run: the manifest check below names a damaged file
    if Path(theirs).resolve() != owner.resolve():
        raise CheckpointError(
            f"--resume auto: the newest checkpoint in checkpoint.dir {root}, {ckpt.name}, was written by the run in "
            f"output.dir {theirs}, not by this one ({owner}); --resume auto continues only this run's checkpoints. "
            f"To continue from it, pass --resume {ckpt}; otherwise give this run its own checkpoint.dir"
        )


def _foreign_checkpoints(root: Path, owner: Path) -> str | None:
    """What a fresh start must not do to another run's checkpoints in a shared checkpoint.dir (None: none)."""
    for _, p in list_tags(root):
        try:
            _check_owner(p, owner, root)
        except CheckpointError:
            theirs = json.loads((p / RUN_CONFIG).read_text())["config"]["output"]["dir"]
            return (
                f"checkpoint.dir {root} holds {p.name} of the run in output.dir {theirs}, not of this one "
                f"({owner}); a fresh start would move it aside into this run's folder. Give this run its own "
                f"checkpoint.dir, or move that run's checkpoints away first"
            )
    return None


def resolve(spec: str | None, ckpt_root: Path, main: bool, owner: Path | None = None) -> ResumePoint | None:
    """The checkpoint `--resume spec` names (None: a fresh start); collective: every rank gets the same
    answer (or the same error). Rank 0 resolves and verifies a normal checkpoint; a universal one is read
    by every rank. A fresh start (spec None) into an explicit checkpoint.dir (`owner` given) that holds
    another run's checkpoints is refused: moving them aside would file them under this run's folder."""
    if spec is None:
        problem = _foreign_checkpoints(ckpt_root, owner) if main and owner is not None else None
        problem = broadcast_object(problem)
        if problem:
            raise CheckpointError(problem)
        return None
    universal = Path(spec) / LATEST_UNIVERSAL
    if spec != "auto" and universal.is_file():  # `reformer-ckpt reshard` output: any world size
        tag = universal.read_text().strip()
        state = load_rank_state(universal.parent / tag, 0)
        return ResumePoint(universal.parent, tag, int(state["step"]), [], universal=True)
    answer: Any = None
    if main:
        try:
            answer = find_resume(spec, ckpt_root, owner=owner)
        except CheckpointError as e:
            answer = e
    answer = broadcast_object(answer)
    if isinstance(answer, Exception):
        raise CheckpointError(str(answer))
    if answer is None and main:
        log.info(f"--resume {spec}: no complete checkpoint in {ckpt_root}; starting fresh")
    return answer


def deepspeed_config_for(point: ResumePoint | None, ds_config: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed dict that can load `point`: a universal checkpoint needs `checkpoint.load_universal`."""
    if point is None or not point.universal:
        return ds_config
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


# ---------------------------------------------------------------------------------------------- fitting
def run_config_record(cfg: RunConfig, plan: BatchPlan, world_size: int) -> dict[str, Any]:
    """What a checkpoint records about its run (run_config.json) and a resume compares against."""
    return {"config": cfg.to_dict(), "plan": dataclasses.asdict(plan), "world_size": world_size}


def read_run_config(ckpt_dir: Path) -> dict[str, Any]:
    """A checkpoint's run_config.json (`run_config_record` at save time)."""
    p = ckpt_dir / RUN_CONFIG
    try:
        body = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: cannot be read ({e})") from None
    if (
        not isinstance(body, dict)
        or not isinstance(body.get("config"), dict)
        or not isinstance(body.get("plan"), dict)
        or not all(isinstance(v, dict) for v in body["config"].values())
    ):
        raise CheckpointError(
            f'{p}: expected {{"config": {{section: {{key: value}}}}, "plan": {{...}}, ...}} as '
            "reformer-train writes it; the file was altered"
        )
    return body


def compare_run_configs(
    saved: dict[str, Any], current: dict[str, Any], universal: bool = False
) -> tuple[list[str], list[str]]:
    """(errors, warnings) between a checkpoint's run config and the current one, as dotted keys.

    The model must match (the weights mean something else otherwise). An exact resume also needs the
    same data-parallel layout (per-rank loader states); a universal one the same global batch (the data
    order) and sequence-parallel size. Other differences are allowed (e.g. a longer max_steps) but
    reported, because they break the "same losses as an uninterrupted run" guarantee.
    """
    errors, warnings = [], []
    for section, body in current["config"].items():
        old = saved["config"].get(section, {})
        for key, value in body.items():
            if old.get(key, value) != value:
                dotted = f"{section}.{key}"
                msg = f"{dotted}: checkpoint has {old.get(key)!r}, this run {value!r}"
                if section == "model":
                    errors.append(msg)
                elif dotted not in HARMLESS:
                    warnings.append(msg)
    have, want = saved["plan"], current["plan"]
    if universal:
        if have.get("global_batch") != want["global_batch"]:
            errors.append(
                f"batch plan global_batch: checkpoint has {have.get('global_batch')}, this run "
                f"{want['global_batch']} (set train.global_batch to keep the same data order)"
            )
        if have.get("sp_size", 1) != want["sp_size"]:
            errors.append("parallel.sequence_parallel_size must stay the same across a reshard")
        return errors, warnings
    for key in ("dp_size", "sp_size", "micro_batch", "grad_accum"):
        if have.get(key, 1 if key == "sp_size" else None) != want.get(key):
            errors.append(
                f"batch plan {key}: checkpoint has {have.get(key)}, this run {want.get(key)} "
                f"(exact resume needs the same data- and sequence-parallel sizes, micro batch and grad "
                f"accumulation)"
            )
    return errors, warnings


# ---------------------------------------------------------------------------------------------- loading
def check_fit(point: ResumePoint, record: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """Whether `point` fits this run (`compare_run_configs`, this rank's trainer state and world size);
    returns this rank's trainer state. Called before the run folder is written: a refused resume changes
    nothing there."""
    errors, warnings = compare_run_configs(read_run_config(point.path), record, point.universal)
    if errors:
        raise CheckpointError(f"{point.path / RUN_CONFIG}: checkpoint does not fit this run:\n  " + "\n  ".join(errors))
    if warnings and rank == 0:
        why = "" if point.universal else " (losses will differ from an uninterrupted run)"
        log.warning(f"resuming with a changed config{why}:\n  " + "\n  ".join(warnings))
    state = load_rank_state(point.path, 0 if point.universal else rank)
    if not point.universal and saved_world_size(state) != world_size:
        raise CheckpointError(
            f"{state_path(point.path, rank)}: saved with world size {saved_world_size(state)}, "
            f"this run has {world_size}"
        )
    return state


def load(
    point: ResumePoint,
    engine: Engine,
    loader: Stateful,
    train: TrainState,
    record: dict[str, Any],
    rank: int,
    world_size: int,
    seed: int,
    abandon_newer_in: Path | None,
    state: dict[str, Any] | None = None,
) -> None:
    """Load `point` into the engine (DeepSpeed), the loader and `train` (the trainer's counters). Every rank
    calls this. `abandon_newer_in`: the run's checkpoint root when the checkpoint was named explicitly
    (`--resume PATH`): its checkpoints newer than `point` are moved aside there. `state`: what `check_fit`
    returned (checked again when not given)."""
    if state is None:
        state = check_fit(point, record, rank, world_size)
    load_path, _ = engine.load_checkpoint(
        str(point.root), tag=point.tag, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if load_path is None:
        raise CheckpointError(f"{point.path}: DeepSpeed could not load this checkpoint")
    restore_rank_state(state, train, loader, rng=not point.universal)
    if point.universal:  # per-rank streams of another world size do not exist: derive them from the step
        seed_all(rank_seed(seed, rank, resumed_at_step=train.step))
    elif rank == 0 and abandon_newer_in is not None:
        abandon_newer_than(abandon_newer_in, point.step)
    barrier()


# ---------------------------------------------------------------------------------------------- moving aside
def abandon_newer_than(root: Path, step: int, quiet: bool = False) -> Path | None:
    """Resuming from an older checkpoint: move newer ones aside so `--resume auto` never returns to them.
    Returns the folder they went to (None: there were none)."""
    newer = [p for s, p in list_tags(root) if s > step]
    if not newer:
        return None
    dest = root / aside_name(ABANDONED_PREFIX)
    dest.mkdir(parents=True, exist_ok=True)
    for p in newer:
        shutil.move(str(p), str(dest / p.name))
    if not quiet:
        log.info(f"moved {len(newer)} newer checkpoint(s) to {dest}")
    return dest


def roll_back_to_finite(root: Path, last_finite: int) -> tuple[int | None, Path | None]:
    """A divergence stop: the weights of step `last_finite` gave only non-finite losses afterwards. Its
    checkpoint (and any newer one) is moved aside and `latest` names the newest complete checkpoint left,
    whose weights gave a finite loss; without one `latest` is removed. Returns (that step, where the moved
    checkpoints went). Rank 0 only."""
    moved = abandon_newer_than(root, last_finite - 1, quiet=True)
    good = next((s for s, p in list_tags(root) if is_complete(p)), None)
    if good is not None:
        atomic_write(root / LATEST, tag_for(good))
    elif (root / LATEST).is_file():
        (root / LATEST).unlink()  # it named a checkpoint that was moved aside
    return good, moved
