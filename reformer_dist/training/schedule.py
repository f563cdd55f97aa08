"""Learning-rate schedule: linear warmup, then cosine / linear decay to `min_lr_ratio * lr`.

A pure function of the step, so resume needs no scheduler state: the trainer sets the LR of step
`s` (1-based, the step about to be taken) on the optimizer's param groups before stepping.
"""

from __future__ import annotations

import math

from reformer_dist.training.config import TrainConfig


def lr_at(step: int, t: TrainConfig) -> float:
    """LR used by optimizer step `step` (1 = first step)."""
    peak, floor = t.lr, t.lr * t.min_lr_ratio
    if t.warmup_steps and step <= t.warmup_steps:
        return peak * step / t.warmup_steps
    if t.decay == "constant":
        return peak
    end = t.decay_steps or t.max_steps
    span = max(end - t.warmup_steps, 1)
    progress = min(max(step - t.warmup_steps, 0) / span, 1.0)
    if t.decay == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
