"""Record and replay the RNG state, so recomputed forwards draw exactly the dropout masks of the original; and
``dropout``, which draws nothing when it cannot drop anything."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor


class RNGState:
    """The CPU (and current CUDA device) RNG state at one point, so dropout can be replayed exactly."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.device = device
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replay(self):
        """Run a block with the recorded state; the surrounding RNG state is restored afterwards."""
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def replay(state: RNGState | None):
    """``state.replay()``, or a no-op when nothing was recorded (no dropout)."""
    return state.replay() if state is not None else nullcontext()


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout that is the identity (no op, nothing saved, no RNG drawn) when it cannot drop anything."""
    return F.dropout(x, p, training) if p > 0 and training else x
