"""The trainer's state as a checkpoint owns it (TrainState, the rank-state file), the seeding policy and the
non-finite-step policy, each checked on its own (no process group: one rank)."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import torch

from reformer_dist import ondisk
from reformer_dist.training import checkpointing as ckpt, nonfinite, seeding
from reformer_dist.training.config import BatchPlan
from reformer_dist.training.train_state import TrainState


class Loader:
    def __init__(self, position=0):
        self.position = position

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def test_train_state_round_trips_through_a_rank_state_file(tmp_path):
    saved = TrainState(step=7, tokens_seen=7 * 4096, nonfinite_streak=0, nonfinite_total=2, unigram_loss=3.25)
    torch.manual_seed(11)
    state = ckpt.rank_state(saved, Loader(123), world_size=4)
    # the file's keys: the TrainState fields (written once, in the dataclass) and what the checkpoint adds
    assert set(state) == {
        "step",
        "tokens_seen",
        "nonfinite_streak",
        "nonfinite_total",
        "unigram_loss",
        "world_size",
        "loader",
        "rng",
    }
    expected_next = torch.rand(3)  # what the saved torch stream draws next
    ckpt.save_rank_state(tmp_path, 2, state)
    assert (tmp_path / ondisk.rank_state_file(2)).is_file()

    torch.manual_seed(99)
    back, loader = TrainState(), Loader()
    loaded = ckpt.load_rank_state(tmp_path, 2)
    ckpt.restore_rank_state(loaded, back, loader)
    assert back == saved and loader.position == 123 and ckpt.saved_world_size(loaded) == 4
    assert torch.equal(torch.rand(3), expected_next)


def test_a_universal_resume_keeps_its_own_rng_and_older_files_lack_the_baseline():
    # a checkpoint written before unigram_loss existed: the field keeps its default
    old = {
        "step": 5,
        "tokens_seen": 50,
        "nonfinite_streak": 0,
        "nonfinite_total": 0,
        "world_size": 2,
        "loader": {"position": 9},
        "rng": "not restored",
    }
    back, loader = TrainState(unigram_loss=None), Loader()
    ckpt.restore_rank_state(old, back, loader, rng=False)
    assert back == TrainState(step=5, tokens_seen=50) and loader.position == 9


def test_seeding_policy():
    # initial weights: the same seed on every rank; afterwards one stream per rank; a universal resume one per
    # (rank, step): no two of these coincide for any realistic world size and step
    seeds = {seeding.rank_seed(17, r) for r in range(4096)}
    assert len(seeds) == 4096 and 17 not in seeds
    resumed = {seeding.rank_seed(17, r, s) for r in range(64) for s in range(0, 20000, 250)}
    assert len(resumed) == 64 * 80
    assert seeding.rank_seed(17, 3, 0) == seeding.rank_seed(17, 3)  # step 0 is a fresh start's stream
    assert seeding.step_hash_seed(1000, 0) == 1000 and seeding.step_hash_seed(1000, 5) == 1005

    seeding.seed_all(5)
    drawn = (random.random(), np.random.rand(), torch.rand(1).item())
    saved = seeding.capture_rng()
    after = (random.random(), np.random.rand(), torch.rand(1).item())
    seeding.seed_all(5)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == drawn
    seeding.restore_rng(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == after


def test_nonfinite_policy_counts_streaks_and_stops_past_the_limit(tmp_path):
    plan = BatchPlan(**{f.name: 1 for f in dataclasses.fields(BatchPlan)} | {"grad_accum": 2, "sp_size": 1})
    assert nonfinite.mean_loss(torch.tensor([3.0], dtype=torch.float64), plan) == 1.5  # 2 micro-batches, 1 rank
    assert nonfinite.skip(math.inf) and nonfinite.skip(math.nan) and not nonfinite.skip(1e30)

    state = TrainState(step=10)
    for skipped, streak, total in ((True, 1, 1), (True, 2, 2), (False, 0, 2), (True, 1, 3)):
        nonfinite.count(state, skipped)
        assert (state.nonfinite_streak, state.nonfinite_total) == (streak, total)
    assert not nonfinite.exceeded(state, limit=1)
    nonfinite.count(state, True)
    assert nonfinite.exceeded(state, limit=1)

    # steps 11 and 12 skipped after step 10: the checkpoint of step 10 holds the weights that diverged
    root = tmp_path / "ckpt"
    for step in (5, 10):
        d = root / ondisk.tag_for(step)
        d.mkdir(parents=True)
        (d / "x").write_text(str(step))
        ckpt.commit(root, d.name)
    state = TrainState(step=12, nonfinite_streak=2)
    msg, good = nonfinite.stop(state, limit=1, ckpt_root=root, main=True)
    assert good == 5 and (root / ondisk.LATEST).read_text() == ondisk.tag_for(5)
    assert "steps 11-12" in msg and "weights are still those of step 10" in msg and "moved to" in msg
    assert not (root / ondisk.tag_for(10)).exists()
