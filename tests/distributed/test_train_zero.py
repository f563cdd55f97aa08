"""2 gloo ranks under ZeRO-1/2/3 train exactly like one process with the same global batch.

Why they are numerically equal: the loader hands out global micro-batch i as windows
[i*D*B, (i+1)*D*B) with DP rank r taking the r-th block of B, so "1 process, micro 1, grad accum 2"
and "2 ranks, micro 1, accum 1" see the same two windows per step; both use hash seed base+step;
DeepSpeed averages gradients over accumulation steps and over ranks alike; fp32 on CPU. Only the
summation order of the gradient average differs, hence rtol 1e-5 rather than bitwise.
The run config sets train.global_batch = 2, so the SAME config gives accum 2 on 1 rank, 1 on 2.
Reversible layers are on; ZeRO-3 gathers parameters inside their backward recompute.
"""

from __future__ import annotations

import pytest

from tests.distributed.train_launcher import REPO, launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 5
COMMON = ["train.global_batch=2", f"train.max_steps={STEPS}"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run = launch(
        1,
        tmp_path_factory.mktemp("single"),
        COMMON + [f"deepspeed.config={REPO}/configs/deepspeed/zero1.json"],
        launcher="python",
    )
    (start,) = run.records(0, "start")
    assert (start["world_size"], start["grad_accum"], start["global_batch"]) == (1, 2, 2)
    return run.losses(0)


# ZeRO-1 goes through the deepspeed launcher (which appends --local_rank=N), the others through torchrun.
@pytest.mark.parametrize("stage, launcher", [(1, "deepspeed"), (2, "torchrun"), (3, "torchrun")])
def test_two_ranks_match_one_process(tmp_path, single, stage, launcher):
    # ZeRO-3 also evaluates between steps (must not perturb training), saves and samples at the end:
    # under ZeRO-3 those need every rank (gathered parameters).
    extra = (
        ["eval.every=2", "eval.at_end=true", "eval.batches=1", "output.sample_tokens=8", "output.save_model=true"]
        if stage == 3
        else []
    )
    run = launch(
        2, tmp_path, COMMON + extra + [f"deepspeed.config={REPO}/configs/deepspeed/zero{stage}.json"], launcher=launcher
    )
    for rank in (0, 1):
        (start,) = run.records(rank, "start")
        assert (start["rank"], start["world_size"], start["dp_size"], start["grad_accum"]) == (rank, 2, 2, 1)
        assert start["zero_stage"] == stage
        losses = run.losses(rank)
        assert sorted(losses) == list(range(1, STEPS + 1)), run.output[-3000:]
        for step, loss in single.items():
            assert losses[step] == pytest.approx(loss, rel=1e-5, abs=0), f"step {step}, rank {rank}, ZeRO-{stage}"
    # the two ranks really trained on different data: their local (per-rank) losses differ
    local = [[r["local_loss"] for r in run.records(rank, "step")] for rank in (0, 1)]
    assert local[0] != local[1]
    assert single[STEPS] < single[1]  # and it learns
    if stage == 3:
        evals = [[(r["step"], r["eval_loss"]) for r in run.records(rank, "eval")] for rank in (0, 1)]
        assert [s for s, _ in evals[0]] == [2, 4, 5] and evals[0] == evals[1]  # all-reduced: one answer
        assert "--- sample (8 tokens" in run.output and (tmp_path / "model" / "model.safetensors").is_file()
