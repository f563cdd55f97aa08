"""`reformer-train` with sequence parallelism equals one process with the same global batch.

SP=2 (2 ranks share each sequence) and SP=2 x DP=2 under ZeRO-2 (4 ranks), with Ulysses, with bucket
sharding (parallel.ulysses_size = 1), and with document masks: per-step losses equal a single process that
sees the same windows whole (fp32, rtol 1e-5). The loader gives each SP rank its slice of the same window
with its global position offset; LSH rotations are identical per head.
"""

from __future__ import annotations

import pytest

from tests.distributed.train_launcher import REPO, launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 4
ZERO2 = f"deepspeed.config={REPO}/configs/deepspeed/zero2.json"


def single_process(tmp_path_factory, global_batch: int, extra: tuple[str, ...] = ()) -> dict[int, float]:
    run = launch(
        1,
        tmp_path_factory.mktemp(f"single{global_batch}"),
        [f"train.global_batch={global_batch}", f"train.max_steps={STEPS}", ZERO2, *extra],
        launcher="python",
    )
    return run.losses(0)


DOCS = ("data.document_masking=true", "data.reset_positions=true")


@pytest.mark.parametrize(
    "nprocs, dp, layout",
    [(2, 1, ()), (4, 2, ()), (2, 1, ("parallel.ulysses_size=1",)), (2, 1, DOCS)],
    ids=["ulysses", "ulysses_x_dp2", "bucket", "documents"],
)
def test_sequence_parallel_matches_one_process(tmp_path, tmp_path_factory, nprocs, dp, layout):
    docs = tuple(x for x in layout if x.startswith("data."))
    ref = single_process(tmp_path_factory, global_batch=dp, extra=docs)
    run = launch(
        nprocs,
        tmp_path,
        [f"train.global_batch={dp}", f"train.max_steps={STEPS}", ZERO2, "parallel.sequence_parallel_size=2", *layout],
        timeout=600,
    )
    for rank in range(nprocs):
        (start,) = run.records(rank, "start")
        assert (start["world_size"], start["sp_size"], start["dp_size"]) == (nprocs, 2, dp), run.output[-3000:]
        losses = run.losses(rank)
        assert sorted(losses) == list(range(1, STEPS + 1)), run.output[-3000:]
        for step, loss in ref.items():
            assert losses[step] == pytest.approx(loss, rel=1e-5, abs=0), f"step {step}, rank {rank}"
    assert ref[STEPS] < ref[1]


def test_sequence_parallel_config_errors_name_the_key(tmp_path):
    run = launch(2, tmp_path, ["parallel.sequence_parallel_size=2", "data.seq_len=36"])
    assert "data.seq_len" in run.output and run.returncode != 0


def test_more_sequence_parallel_ranks_than_heads_pick_a_layout_by_default(tmp_path, tmp_path_factory):
    # #26: SP over more ranks than heads failed, asking for parallel.ulysses_size = 1; by default the largest
    # Ulysses size dividing both (here gcd(2, 1) = 1) is chosen, the rest bucket-shard, and the start says so
    one_head = ("model.n_heads=1", "model.d_head=32")
    ref = single_process(tmp_path_factory, global_batch=1, extra=one_head)
    run = launch(
        2,
        tmp_path,
        ["train.global_batch=1", f"train.max_steps={STEPS}", ZERO2, "parallel.sequence_parallel_size=2", *one_head],
        timeout=600,
    )
    assert (
        "sequence parallelism: 2 ranks per sequence = Ulysses 1 (heads) x bucket 2 (LSH's sorted order); "
        "parallel.ulysses_size = 1 (chosen: model.n_heads = 1 is not a multiple of "
        "parallel.sequence_parallel_size = 2" in run.output
    ), run.output[-3000:]
    for rank in range(2):
        (start,) = run.records(rank, "start")
        assert start["ulysses_size"] == 1 and start["layout_note"].startswith("parallel.ulysses_size = 1 (chosen")
        losses = run.losses(rank)
        for step, loss in ref.items():
            assert losses[step] == pytest.approx(loss, rel=1e-5, abs=0), f"step {step}, rank {rank}"
