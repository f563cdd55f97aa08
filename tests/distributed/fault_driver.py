"""Run reformer-train with injected faults, chosen by environment variables (test driver, not product code).

FAULT_NAN_STEPS="3,4"   training loss of these steps becomes NaN (gradients too)
FAULT_SIGNAL_STEP=3     this rank sends itself SIGUSR1 during that step's first forward
FAULT_RANK=1            only on this rank (default: every rank)
FAULT_SAVE_STEP=2       the checkpoint save of this step fails after DeepSpeed wrote its files, as
FAULT_SAVE=enospc         ... a full disk: a half-written file, then OSError(ENOSPC)
FAULT_SAVE=torch          ... a full disk as torch.save reports it (RuntimeError "unexpected pos")
FAULT_SAVE=kill           ... SIGKILL of this process (OOM killer, node failure)
FAULT_HANG_STEP=4       in that step's first forward: write <output.dir>/hanging, then sleep until killed
                        (a step that does not end: lets a test send signals at a known point)

The step is recovered from the hash seed the trainer passes (model.hash_seed + step - 1, base 0 here).
"""

import errno
import os
import signal
import sys
import time
from pathlib import Path

from reformer_dist.model.reformer import ReformerLM
from reformer_dist.training import checkpointing

NAN_STEPS = {int(s) for s in os.environ.get("FAULT_NAN_STEPS", "").split(",") if s}
SIGNAL_STEP = int(os.environ.get("FAULT_SIGNAL_STEP", "0"))
ONLY_RANK = os.environ.get("FAULT_RANK")
SAVE_STEP = int(os.environ.get("FAULT_SAVE_STEP", "0"))
SAVE_FAULT = os.environ.get("FAULT_SAVE", "")
HANG_STEP = int(os.environ.get("FAULT_HANG_STEP", "0"))
_forward = ReformerLM.forward
_save_rank_state = checkpointing.save_rank_state


def _mine() -> bool:
    return ONLY_RANK is None or os.environ.get("RANK", "0") == ONLY_RANK


def forward(self, input_ids, labels=None, **kwargs):
    out = _forward(self, input_ids, labels, **kwargs)
    if labels is None or not self.training or not _mine() or kwargs.get("hash_seed") is None:
        return out
    step = kwargs["hash_seed"] - self.cfg.hash_seed + 1
    if step == SIGNAL_STEP:
        os.kill(os.getpid(), signal.SIGUSR1)
    if step == HANG_STEP:
        out_dir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("output.dir="))
        (Path(out_dir) / "hanging").write_text(str(os.getpid()))
        while True:
            time.sleep(0.05)
    if step in NAN_STEPS:
        out = out * float("nan")
    return out


def save_rank_state(ckpt_dir, rank, state):
    if state["step"] == SAVE_STEP and _mine():
        if SAVE_FAULT == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if SAVE_FAULT in ("enospc", "torch"):
            path = checkpointing.state_path(ckpt_dir, rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".pt.tmp").write_bytes(b"PK\x03\x04 half")  # what the full disk let through
            if SAVE_FAULT == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1600 vs 1548")
    return _save_rank_state(ckpt_dir, rank, state)


ReformerLM.forward = forward
checkpointing.save_rank_state = save_rank_state

if __name__ == "__main__":
    from reformer_dist.cli.train import main

    sys.exit(main())
