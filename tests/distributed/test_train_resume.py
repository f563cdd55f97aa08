"""Exact resume: 6 steps straight == 3 steps, stop, resume for 3 more (same losses, same weights).

2 gloo ranks, ZeRO-3, dropout on (so the restored torch RNG matters), fresh LSH hashes per step; as 2
data-parallel ranks and as one sequence over 2 bucket-sharded ranks. The schedule is pinned with
train.decay_steps, so stopping at max_steps=3 does not change it.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.train_launcher import REPO, launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

COMMON = [
    "train.global_batch=4",
    "train.decay_steps=6",
    "model.dropout=0.1",
    "output.save_model=true",
    f"deepspeed.config={REPO}/configs/deepspeed/zero3.json",
]


@pytest.mark.parametrize(
    "layout",
    [[], ["parallel.sequence_parallel_size=2", "parallel.ulysses_size=1"]],
    ids=["data_parallel", "bucket_sharded"],
)
def test_resume_reproduces_the_uninterrupted_run(tmp_path, layout):
    common = COMMON + layout
    straight = launch(2, tmp_path / "straight", common + ["train.max_steps=6"])
    first = launch(2, tmp_path / "resumed", common + ["train.max_steps=3", "checkpoint.at_end=true"])
    # a fresh start must not be mistaken for a resume of the first part
    assert [r["resume_step"] for r in first.records(0, "start")] == [None]
    ckpts = tmp_path / "resumed" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000003"
    manifest = json.loads((ckpts / "step_00000003" / "MANIFEST.json").read_text())
    assert {"trainer_state/rank00000.pt", "trainer_state/rank00001.pt", "run_config.json"} <= set(manifest["files"])

    second = launch(2, tmp_path / "resumed", common + ["train.max_steps=6"], extra_args=["--resume", "auto"])
    for rank in (0, 1):
        starts = second.records(rank, "start")
        assert [s["resume_step"] for s in starts] == [None, 3] and all(s["world_size"] == 2 for s in starts)
        want, got = straight.losses(rank), second.losses(rank)
        assert sorted(got) == [1, 2, 3, 4, 5, 6], second.output[-3000:]
        assert got == want  # bitwise: same ranks, same order of operations

    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
