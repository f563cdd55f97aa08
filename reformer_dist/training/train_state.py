"""The trainer's own state: what a checkpoint saves for it and a resume gives back.

`TrainState` is the one list of these keys (lingua's `TrainState`, torchtitan's `train_state`): the
checkpoint writes `state_dict()` into every rank's trainer-state file (training/checkpointing.py,
`rank_state`) beside the loader position and the RNG streams, and resume fills it with
`load_state_dict` (training/resume.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class TrainState:
    """Counters of one run; identical on every rank."""

    step: int = 0  # optimizer steps done (the next step is step + 1)
    tokens_seen: int = 0  # training tokens consumed by those steps (all ranks)
    nonfinite_streak: int = 0  # steps in a row whose mean loss was not finite (their updates were skipped)
    nonfinite_total: int = 0  # such steps in the whole run
    unigram_loss: float | None = None  # the evaluation split's unigram baseline, once computed (nats/token)

    def state_dict(self) -> dict[str, Any]:
        """The fields as a flat dict (the trainer-state file keeps them at its top level)."""
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Fill the fields from a saved dict; a key an older checkpoint lacks keeps its default."""
        for f in dataclasses.fields(self):
            if f.name in state:
                value = state[f.name]
                setattr(self, f.name, int(value) if f.type == "int" else value)  # the counters as Python ints
