"""The run folder (`output.dir`): what a run writes there before training, and what a fresh start does with
an earlier run's files (names: reformer_dist/ondisk.py)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from reformer_dist.ondisk import (
    CHECKPOINTS_DIR,
    DEEPSPEED_CONFIG,
    LOCK_NAME,
    METRICS,
    MODEL_DIR,
    RANKS_DIR,
    REPLACED_PREFIX,
    RUN_CONFIG_TOML,
    TENSORBOARD_DIR,
    aside_name,
    atomic_write,
)
from reformer_dist.training.checkpointing import list_tags
from reformer_dist.training.config import RunConfig, to_toml

log = logging.getLogger(__name__)


def prepare_run_dir(cfg: RunConfig, ds_config: dict[str, Any], fresh: bool) -> None:
    """Rank 0, once the resume (if any) was checked: create the run folder, move an earlier run's files aside
    on a fresh start (`fresh`: no --resume), and write the resolved config and DeepSpeed dict."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    if fresh:
        archive_previous_run(cfg.run_dir, cfg.checkpoint_dir)
    atomic_write(cfg.run_dir / RUN_CONFIG_TOML, to_toml(cfg))
    atomic_write(cfg.run_dir / DEEPSPEED_CONFIG, json.dumps(ds_config, indent=2) + "\n")


def archive_previous_run(run_dir: Path, ckpt_root: Path) -> None:
    """A fresh start (no --resume) into a used run dir moves the old artefacts aside instead of mixing them."""
    old = [
        run_dir / n
        for n in (RUN_CONFIG_TOML, DEEPSPEED_CONFIG, METRICS, TENSORBOARD_DIR, MODEL_DIR, RANKS_DIR)
        if (run_dir / n).exists()
    ]
    ckpts = list_tags(ckpt_root)
    if not old and not ckpts:
        return
    dest = run_dir / aside_name(REPLACED_PREFIX)
    dest.mkdir(parents=True, exist_ok=True)
    for p in old:
        shutil.move(str(p), str(dest / p.name))
    if ckpts:  # the contents, not the folder: it holds this run's lock (run_lock.py)
        (dest / CHECKPOINTS_DIR).mkdir()
        for p in ckpt_root.iterdir():
            if p.name != LOCK_NAME:
                shutil.move(str(p), str(dest / CHECKPOINTS_DIR / p.name))
    log.info(f"fresh start (no --resume): moved the previous run's files to {dest}")
