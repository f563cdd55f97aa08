"""The quickstart config runs end to end (a few steps): eval with the unigram baseline, model, sample."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reformer_dist.parallel.env import intra_op_threads

pytestmark = pytest.mark.slow  # a reformer-train subprocess

REPO = Path(__file__).resolve().parents[2]


def test_quickstart_config_runs_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
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
            "train.max_steps=3",
            "--set",
            "eval.every=2",
            "--set",
            "eval.batches=1",
            "--set",
            "output.sample_tokens=5",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "unigram baseline" in p.stderr and "--- sample (5 tokens" in p.stderr
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in recs if r["event"] != "step"] == ["start", "eval", "eval", "checkpoint", "end"]
    end = recs[-1]
    assert end["eval_loss"] > 0 and end["unigram_loss"] > 0
    # the summary's direction word matches the numbers (3 steps: worse than the unigram baseline)
    gain = (end["unigram_loss"] - end["eval_loss"]) / math.log(2)
    word = "better" if gain >= 0 else "worse"
    assert f"({abs(gain):.2f} bits/token {word} than the baseline)" in p.stderr, p.stderr[-2000:]
    # one process on this machine: all the cores it may use, unless OMP_NUM_THREADS says otherwise
    assert recs[0]["threads"] == intra_op_threads(1, None, env)[0]
    assert (tmp_path / "model" / "model.safetensors").is_file() and (tmp_path / "config.toml").is_file()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000003"
