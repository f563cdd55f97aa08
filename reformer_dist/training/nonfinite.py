"""The non-finite-step policy: every rank skips a step whose mean loss is not finite, and a streak of them
ends the run without saving the weights that produced them.

- The decision is made BEFORE the boundary `engine.step`, the same way on every rank: the logged losses of
  all ranks and micro-batches are all-reduced and averaged as DeepSpeed counts them (the SP batch rule,
  parallel/config.py), and a non-finite mean skips the update everywhere (`mean_loss`).
- More than `train.max_nonfinite_steps` skipped steps in a row stop the run (exit code 3). No checkpoint
  is written at a step whose loss was not finite, and at the stop `latest` is moved back to the newest
  checkpoint whose weights gave a finite loss (`stop`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from reformer_dist.ondisk import tag_for
from reformer_dist.parallel.collectives import all_reduce_host, broadcast_object
from reformer_dist.parallel.config import deepspeed_sequences
from reformer_dist.training.config import BatchPlan
from reformer_dist.training.resume import roll_back_to_finite
from reformer_dist.training.train_state import TrainState


def mean_loss(local_sum: torch.Tensor, plan: BatchPlan) -> float:
    """The step's mean loss over every rank and micro-batch (collective): `local_sum` is this rank's sum of
    its micro-batches' logged losses (float64, CPU)."""
    total = all_reduce_host(local_sum.clone())
    return float(total / deepspeed_sequences(plan.grad_accum * plan.dp_size, plan.sp_size))


def skip(loss: float) -> bool:
    """Whether a step with this mean loss must leave the weights alone."""
    return not math.isfinite(loss)


def count(state: TrainState, skipped: bool) -> None:
    """Update the streak and the run's total after a step."""
    if skipped:
        state.nonfinite_streak += 1
        state.nonfinite_total += 1
    else:
        state.nonfinite_streak = 0


def exceeded(state: TrainState, limit: int) -> bool:
    """Whether the streak is past `train.max_nonfinite_steps` (the run stops)."""
    return state.nonfinite_streak > limit


def skipped_message(state: TrainState, loss: float, limit: int) -> str:
    """What the user is told about one skipped step."""
    return (
        f"step {state.step}: non-finite loss ({loss}), update skipped ({state.nonfinite_streak} in a row, "
        f"limit {limit})"
    )


def stop(state: TrainState, limit: int, ckpt_root: Path, main: bool) -> tuple[str, int | None]:
    """Stop after too many non-finite steps (collective). The weights now are those of the last finite step
    S, and they gave the non-finite losses: nothing is saved, and a checkpoint of step >= S is moved aside so
    that `latest` (and `--resume auto`) name the newest checkpoint whose weights gave a finite loss.
    Returns the message for the user and that checkpoint's step (None: there is none)."""
    last_finite = state.step - state.nonfinite_streak
    good, moved = roll_back_to_finite(ckpt_root, last_finite) if main else (None, None)
    good, moved = broadcast_object((good, moved))
    if good is not None:
        where = (
            f"`latest` names {ckpt_root / tag_for(good)}, the last checkpoint whose weights gave a finite "
            f"loss (step {good}); lower train.lr (or check the data) and run again with --resume auto"
        )
    else:
        where = (
            "there is no checkpoint whose weights gave a finite loss; lower train.lr (or check the data) "
            "and start again"
        )
    msg = (
        f"stopping: {state.nonfinite_streak} non-finite steps in a row, steps {last_finite + 1}-{state.step} "
        f"(more than train.max_nonfinite_steps = {limit}). None of them was saved: the weights are still those "
        f"of step {last_finite}, which gave these losses. {where[0].upper()}{where[1:]}."
    )
    if moved:
        msg += f" The checkpoint of step {last_finite} (those weights) was moved to {moved}."
    return msg, good
