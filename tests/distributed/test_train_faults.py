"""Non-finite losses and preemption, injected by tests/distributed/fault_driver.py into real runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.train_launcher import launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

DRIVER = Path(__file__).with_name("fault_driver.py")
COMMON = ["train.global_batch=2", "train.decay_steps=8"]


def test_nonfinite_loss_on_one_rank_skips_the_step_on_all(tmp_path):
    # NaN on rank 1 only, steps 3 and 4: both ranks must skip both updates, so the weights after
    # step 4 are exactly those after step 2.
    faulty = launch(
        2,
        tmp_path / "faulty",
        COMMON + ["train.max_steps=4", "output.save_model=true"],
        script=DRIVER,
        env={"FAULT_NAN_STEPS": "3,4", "FAULT_RANK": "1"},
    )
    ref = launch(2, tmp_path / "ref", COMMON + ["train.max_steps=2", "output.save_model=true"])
    assert ref.returncode == 0, ref.output[-3000:]
    for rank in (0, 1):
        steps = {r["step"]: r for r in faulty.records(rank, "step")}
        assert [steps[s]["skipped"] for s in (1, 2, 3, 4)] == [False, False, True, True], faulty.output[-3000:]
        assert steps[4]["nonfinite_streak"] == 2
    a = load_file(str(tmp_path / "faulty" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and len(b) > 0  # a tensor missing from either side is a failure, not a pass
    for k in b:
        assert torch.equal(a[k], b[k]), k


def test_too_many_nonfinite_steps_stop_without_saving_them(tmp_path):
    run = launch(
        1,
        tmp_path,
        COMMON + ["train.max_steps=10", "train.max_nonfinite_steps=2", "checkpoint.every=2"],
        launcher="python",
        script=DRIVER,
        env={"FAULT_NAN_STEPS": "2,3,4,5,6,7,8,9,10"},
    )
    (stopped,) = run.records(0, "stopped")
    assert stopped["step"] == 4 and "train.max_nonfinite_steps = 2" in stopped["message"]
    assert (
        "non-finite steps in a row" in run.output
        and "There is no checkpoint whose weights gave a finite loss" in run.output
    ), run.output[-3000:]
    assert run.returncode == 3
    # #26: the stop used to save step 4 (the weights of step 1, which gave NaN) and point `latest` at it
    assert not (tmp_path / "checkpoints" / "latest").exists()
    assert not [p for p in (tmp_path / "checkpoints").glob("step_*")]
    assert "step 2: no checkpoint: its loss was not finite" in run.output


def test_divergence_stop_points_latest_at_the_last_good_checkpoint_and_resumes(tmp_path):
    # #26: with checkpoint.every = 1 and keep_last = 1, rotation deleted the last good checkpoint and the stop
    # left only poisoned ones. Steps 1-3 finite (saved), 4-6 NaN: the weights of step 3 gave the NaNs, so
    # `latest` must name step 2, whose weights gave the finite loss of step 3.
    run = launch(
        1,
        tmp_path,
        COMMON + ["train.max_steps=8", "train.max_nonfinite_steps=2", "checkpoint.every=1", "checkpoint.keep_last=1"],
        launcher="python",
        script=DRIVER,
        env={"FAULT_NAN_STEPS": "4,5,6,7,8"},
    )
    assert run.returncode == 3, run.output[-3000:]
    (stopped,) = run.records(0, "stopped")
    root = tmp_path / "checkpoints"
    assert stopped["step"] == 6 and stopped["last_good_checkpoint"] == 2
    assert (
        f"`latest` names {root / 'step_00000002'}, the last checkpoint whose weights gave a finite loss "
        "(step 2)" in stopped["message"]
    ), stopped["message"]
    assert "The checkpoint of step 3 (those weights) was moved to" in stopped["message"]
    assert (root / "latest").read_text() == "step_00000002"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002"]
    (aside,) = root.glob("abandoned-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step_00000003"]  # nothing of steps 4-6 was ever saved
    manifest = json.loads((root / "step_00000002" / "MANIFEST.json").read_text())
    assert manifest["step"] == 2 and math.isfinite(manifest["loss"])

    again = launch(
        1,
        tmp_path,
        COMMON + ["train.max_steps=8", "checkpoint.every=1", "checkpoint.keep_last=1", "train.lr=1e-3"],
        launcher="python",
        extra_args=["--resume", "auto"],
    )
    assert again.returncode == 0, again.output[-3000:]
    assert [s["resume_step"] for s in again.records(0, "start")][-1] == 2
    assert again.records(0, "end")[0]["step"] == 8


def test_preemption_signal_on_one_rank_checkpoints_and_resumes(tmp_path):
    first = launch(
        2, tmp_path, COMMON + ["train.max_steps=6"], script=DRIVER, env={"FAULT_SIGNAL_STEP": "3", "FAULT_RANK": "1"}
    )
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
