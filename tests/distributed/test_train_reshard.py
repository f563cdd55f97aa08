"""A run saved on 2 ranks, resharded with `reformer-ckpt reshard`, resumes on 1 rank through
`reformer-train --resume` and continues with the losses of an uninterrupted run (fp32, rtol 1e-5).

Same global batch on both sides (2 ranks x accum 1 vs 1 rank x accum 2), so the data order is the
same; the uninterrupted reference is one process (equal to 2 ranks, see test_train_zero.py).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.distributed.train_launcher import REPO, clean_env, launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

COMMON = ["train.global_batch=2", "train.decay_steps=6", f"deepspeed.config={REPO}/configs/deepspeed/zero2.json"]


def test_two_ranks_reshard_resume_on_one(tmp_path):
    straight = launch(1, tmp_path / "straight", COMMON + ["train.max_steps=6"], launcher="python").losses(0)
    first = launch(2, tmp_path / "two", COMMON + ["train.max_steps=3", "checkpoint.at_end=true"])
    assert [r["world_size"] for r in first.records(0, "start")] == [2]
    uni = tmp_path / "universal"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "reformer_dist.cli.ckpt",
            "reshard",
            str(tmp_path / "two" / "checkpoints"),
            "--out",
            str(uni),
        ],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    resumed = launch(
        1,
        tmp_path / "one",
        COMMON + ["train.max_steps=6", "checkpoint.at_end=true"],
        launcher="python",
        extra_args=["--resume", str(uni)],
    )
    (start,) = resumed.records(0, "start")
    assert (start["world_size"], start["resume_step"]) == (1, 3), resumed.output[-3000:]
    losses = resumed.losses(0)
    assert sorted(losses) == [4, 5, 6], resumed.output[-3000:]
    for step in (4, 5, 6):
        assert losses[step] == pytest.approx(straight[step], rel=1e-5, abs=0), f"step {step}"
    assert straight[6] != straight[3]
