"""Run reformer-train with injected faults, chosen by environment variables (test driver, not product code).

FAULT_NAN_STEPS="3,4"   training loss of these steps becomes NaN (gradients too)
FAULT_SIGNAL_STEP=3     this rank sends itself SIGUSR1 during that step's first forward
FAULT_RANK=1            only on this rank (default: every rank)

The step is recovered from the hash seed the trainer passes (model.hash_seed + step - 1, base 0 here).
"""

import os
import signal
import sys

from reformer_dist.model.reformer import ReformerLM

NAN_STEPS = {int(s) for s in os.environ.get("FAULT_NAN_STEPS", "").split(",") if s}
SIGNAL_STEP = int(os.environ.get("FAULT_SIGNAL_STEP", "0"))
ONLY_RANK = os.environ.get("FAULT_RANK")
_forward = ReformerLM.forward


def forward(self, input_ids, labels=None, **kwargs):
    out = _forward(self, input_ids, labels, **kwargs)
    mine = ONLY_RANK is None or os.environ.get("RANK", "0") == ONLY_RANK
    if labels is None or not self.training or not mine or kwargs.get("hash_seed") is None:
        return out
    step = kwargs["hash_seed"] - self.cfg.hash_seed + 1
    if step == SIGNAL_STEP:
        os.kill(os.getpid(), signal.SIGUSR1)
    if step in NAN_STEPS:
        out = out * float("nan")
    return out


ReformerLM.forward = forward

if __name__ == "__main__":
    from reformer_dist.cli.train import main

    sys.exit(main())
