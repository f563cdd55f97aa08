"""Evaluation: the held-out loss over the same windows every time, and the unigram baseline."""

from __future__ import annotations

from dataclasses import dataclass

from reformer_dist.config_schema import Section, boolean, int_min, opt, optional


@dataclass
class EvalConfig(Section):
    every: int = opt(200, int_min(0), "evaluate every N steps (0 = only at the end)")
    batches: int = opt(8, int_min(1), "micro-batches per rank per evaluation (the same ones every time)")
    at_end: bool = opt(True, boolean, "evaluate after the last step")
    hash_seed: int | None = opt(None, optional(int_min(0)), "fixed LSH hash seed for eval (default model.hash_seed)")
