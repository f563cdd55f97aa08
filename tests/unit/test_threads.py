"""train.threads = "auto" (training/threads.py): what it picks, when it re-checks, who overrides it, and that
the count never changes a step's loss. Step times here are simulated: timing belongs in
benchmarks/cpu_threads.py, not in tests."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch

from reformer_dist.model.config import ReformerConfig
from reformer_dist.model.reformer import ReformerLM
from reformer_dist.parallel.env import ThreadPlan, intra_op_threads
from reformer_dist.training.config import TrainConfig
from reformer_dist.training.threads import ThreadTuner, candidates

REPO = Path(__file__).resolve().parents[2]


def run(tuner: ThreadTuner, step_time, steps: int, noise: float = 0.03, seed: int = 0) -> list[int]:
    """Drive `tuner` for `steps` steps whose time is step_time(step, count) * (1 +- noise); the counts used."""
    rnd = random.Random(seed)
    used = []
    for i in range(steps):
        count = tuner.next_count()
        used.append(count)
        tuner.record(step_time(i, count) * (1 + rnd.uniform(-noise, noise)) + (2.0 if i == 0 else 0.0))
    return used


def test_candidates_are_one_powers_of_two_and_the_most():
    assert candidates(1) == [1]
    assert candidates(2) == [1, 2]
    assert candidates(6) == [1, 2, 4, 6]
    assert candidates(8) == [1, 2, 4, 8]
    assert candidates(0) == [1]


@pytest.mark.parametrize(
    "times, best",
    [
        ({1: 0.38, 2: 0.23}, 2),  # idle cores: 2 threads 1.65x faster
        ({1: 0.36, 2: 0.70}, 1),  # one core busy: 2 threads 2x slower
        ({1: 0.30, 2: 3.80}, 1),
    ],
)  # the 12x case
def test_auto_chooses_the_fastest_count_within_its_candidates(times, best):
    applied = []
    tuner = ThreadTuner(candidates(2), set_threads=applied.append)
    used = run(tuner, lambda i, c: times[c], 400)
    assert set(used) <= {1, 2} and set(applied) <= {1, 2}
    assert tuner.chosen == best and tuner.choices[0][1:] == (best, "start")
    assert used[0] == 2  # the first step (one-time costs, not compared) runs at the most
    # decided within the first few steps, and re-checks of the other count stay a small share of the run
    assert tuner.choices[0][0] <= 5
    assert used[10:].count(3 - best) <= 0.03 * len(used[10:])


def test_a_count_far_slower_than_the_best_is_tried_for_one_step_only():
    tuner = ThreadTuner([1, 2], set_threads=lambda n: None)
    used = run(tuner, lambda i, c: {1: 0.3, 2: 3.8}[c], 60)
    assert used[:5] == [2, 1, 1, 2, 1]  # warm-up at 2, two probes at 1, one at 2 (12x slower: cut short)
    assert used[5:].count(2) == 0  # not re-tried before its cost fits the re-check budget


def test_auto_follows_the_load_when_it_changes():
    idle, busy = {1: 0.38, 2: 0.23}, {1: 0.36, 2: 0.70}
    tuner = ThreadTuner([1, 2], set_threads=lambda n: None)
    used = run(tuner, lambda i, c: busy[c] if 100 <= i < 300 else idle[c], 900)
    reasons = [(count, why) for _, count, why in tuner.choices]
    assert reasons[:3] == [(2, "start"), (1, "drift"), (2, "re-check")]
    drift_step = tuner.choices[1][0]
    assert 100 < drift_step <= 110  # the busy core is noticed within a few steps
    assert used[-100:].count(2) >= 95


def test_one_candidate_means_no_tuning():
    applied = []
    tuner = ThreadTuner([1], set_threads=applied.append)
    assert not tuner.tuning
    assert run(tuner, lambda i, c: 0.1, 20) == [1] * 20 and tuner.choices == [] and applied == [1]
    with pytest.raises(ValueError, match="thread counts >= 1"):
        ThreadTuner([0, 2])


def test_explicit_settings_win_over_auto(monkeypatch):
    monkeypatch.setattr("reformer_dist.parallel.env.usable_cores", lambda: 4)
    assert intra_op_threads(1, "auto", {}) == ThreadPlan(4, "4 cores / 1 rank on this node", auto=True)
    assert intra_op_threads(2, "auto", {}) == ThreadPlan(2, "4 cores / 2 ranks on this node", auto=True)
    assert intra_op_threads(4, "auto", {}) == ThreadPlan(1, "4 cores / 4 ranks on this node", auto=False)
    assert intra_op_threads(1, "auto", {"OMP_NUM_THREADS": "3"}) == ThreadPlan(3, "OMP_NUM_THREADS")
    assert intra_op_threads(1, 2, {"OMP_NUM_THREADS": "3"}) == ThreadPlan(2, "train.threads")
    assert TrainConfig().threads == "auto"
    for bad in (0, "fast", 1.5, True):
        with pytest.raises(Exception, match='threads: expected "auto" or a positive integer'):
            TrainConfig(threads=bad)


def _step(model: ReformerLM, ids: torch.Tensor, threads: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.set_num_threads(threads)
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids, hash_seed=3)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_the_thread_count_does_not_change_a_steps_loss(dtype, rtol):
    """Bit-identical loss and gradients at 1 and 2 threads, but for the LayerNorm weights' and biases'
    gradients (ATen's CPU layer-norm backward sums rows in per-thread partials): those within rounding."""
    cfg = tomllib.loads((REPO / "configs/quickstart.toml").read_text())["model"]
    torch.manual_seed(0)
    model = ReformerLM(ReformerConfig(**cfg)).to(dtype)
    ids = torch.randint(0, cfg["vocab_size"], (4, 256))
    before = torch.get_num_threads()
    try:
        (loss1, g1), (loss2, g2) = _step(model, ids, 1), _step(model, ids, 2)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(loss1, loss2)
    assert g1.keys() == g2.keys()
    for name in g1:
        if ".norm." in name:
            torch.testing.assert_close(g1[name], g2[name], rtol=rtol, atol=rtol * g1[name].abs().max().item())
        else:
            assert torch.equal(g1[name], g2[name]), name


def _train(tmp_path: Path, *overrides: str) -> list[dict]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "OMP_NUM_THREADS")
    }
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "reformer_dist.cli.train",
            "--config",
            str(REPO / "configs/quickstart.toml"),
            "--set",
            f"output.dir={tmp_path}",
            "--set",
            "train.max_steps=8",
            "--set",
            "train.micro_batch=2",
            "--set",
            "eval.every=0",
            "--set",
            "eval.at_end=false",
            "--set",
            "output.sample_tokens=0",
            "--set",
            "output.save_model=false",
            "--set",
            "checkpoint.at_end=false",
            *overrides,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="auto has one candidate on one core")
@pytest.mark.slow
def test_the_thread_choice_is_visible_in_metrics(tmp_path):
    recs = _train(tmp_path / "auto")
    steps = [r for r in recs if r["event"] == "step"]
    choices = [r for r in recs if r["event"] == "threads"]
    most = len(os.sched_getaffinity(0))  # one rank: all the cores it may use
    assert recs[0]["threads_auto"] is True
    assert len(steps) == 8 and {r["threads"] for r in steps} <= set(candidates(most))
    assert choices and choices[0]["reason"] == "start" and choices[0]["threads"] in candidates(most)
    assert all(t is not None for t in choices[0]["step_time_s"].values())
    after = [r for r in steps if r["step"] == choices[0]["step"] + 1]
    assert after and after[0]["threads"] == choices[0]["threads"]

    fixed = _train(tmp_path / "fixed", "--set", "train.threads=1")
    assert fixed[0]["threads_auto"] is False
    assert {r["threads"] for r in fixed if r["event"] == "step"} == {1}
    assert not [r for r in fixed if r["event"] == "threads"]
