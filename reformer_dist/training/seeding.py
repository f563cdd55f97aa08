"""The seeding policy of a run, and the RNG streams a checkpoint saves.

- Initial weights: `train.seed` on every rank (identical weights; DeepSpeed broadcasts them as well).
- After the model is built: rank r's streams start from `train.seed + 1 + r` (dropout differs per rank).
- A universal resume (another world size: the saved per-rank streams do not exist) restarts rank r at
  `rank_seed(seed, r, step)`: the stride `RESUME_STRIDE`, a prime above any rank count, keeps every
  (rank, step) pair on its own seed.
- LSH rotations: `model.hash_seed + step` in training (steps done so far: fresh rotations per step, the
  same after a resume); evaluation and the final sample use one fixed seed (training/evaluation.py).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

RESUME_STRIDE = 1_000_003


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int, resumed_at_step: int | None = None) -> int:
    """The seed of rank `rank`'s streams after the model is built; `resumed_at_step`: a universal resume."""
    return seed + 1 + rank + (0 if resumed_at_step is None else RESUME_STRIDE * resumed_at_step)


def step_hash_seed(base: int, steps_done: int) -> int:
    """The LSH seed of the step after `steps_done` steps."""
    return base + steps_done


def capture_rng() -> dict[str, Any]:
    """This process's generator states (saved in its trainer-state file)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what `capture_rng` saved."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
