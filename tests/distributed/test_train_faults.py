"""Non-finite losses and preemption, injected by tests/distributed/fault_driver.py into real runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_launcher import launch

pytestmark = pytest.mark.distributed

DRIVER = Path(__file__).with_name("fault_driver.py")
COMMON = ["train.global_batch=2", "train.decay_steps=8"]


def test_nonfinite_loss_on_one_rank_skips_the_step_on_all(tmp_path):
    # NaN on rank 1 only, steps 3 and 4: both ranks must skip both updates, so the weights after
    # step 4 are exactly those after step 2.
    faulty = launch(2, tmp_path / "faulty", COMMON + ["train.max_steps=4", "output.save_model=true"], script=DRIVER,
                    env={"FAULT_NAN_STEPS": "3,4", "FAULT_RANK": "1"})
    ref = launch(2, tmp_path / "ref", COMMON + ["train.max_steps=2", "output.save_model=true"])
    for rank in (0, 1):
        steps = {r["step"]: r for r in faulty.records(rank, "step")}
        assert [steps[s]["skipped"] for s in (1, 2, 3, 4)] == [False, False, True, True], faulty.output[-3000:]
        assert steps[4]["nonfinite_streak"] == 2
    a = load_file(str(tmp_path / "faulty" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_too_many_nonfinite_steps_stop_with_a_checkpoint(tmp_path):
    run = launch(1, tmp_path, COMMON + ["train.max_steps=10", "train.max_nonfinite_steps=2"], launcher="python",
                 script=DRIVER, env={"FAULT_NAN_STEPS": "2,3,4,5,6,7,8,9,10"})
    (stopped,) = run.records(0, "stopped")
    assert stopped["step"] == 4 and "train.max_nonfinite_steps = 2" in stopped["message"]
    assert "non-finite steps in a row" in run.output
    assert run.returncode == 3
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000004"
    assert (tmp_path / "checkpoints" / "step_00000004" / "MANIFEST.json").is_file()


def test_preemption_signal_on_one_rank_checkpoints_and_resumes(tmp_path):
    first = launch(2, tmp_path, COMMON + ["train.max_steps=6"], script=DRIVER,
                   env={"FAULT_SIGNAL_STEP": "3", "FAULT_RANK": "1"})
    for rank in (0, 1):
        (pre,) = first.records(rank, "preempted")
        assert pre["step"] == 3, first.output[-3000:]
        assert not first.records(rank, "end")
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000003"

    second = launch(2, tmp_path, COMMON + ["train.max_steps=6"], extra_args=["--resume", "auto"])
    for rank in (0, 1):
        assert [s["resume_step"] for s in second.records(rank, "start")] == [None, 3]
        assert second.records(rank, "end")[0]["step"] == 6, second.output[-3000:]
        assert sorted(second.losses(rank)) == [1, 2, 3, 4, 5, 6]
