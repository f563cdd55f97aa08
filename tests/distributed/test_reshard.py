"""A run saved by 2 gloo ranks (ZeRO-2) resumes on 1 rank after `reformer-ckpt reshard` and continues with
the same losses as the uninterrupted 2-rank run (same global batches, same hash seeds).

The 1-rank run starts from different random weights, loads the universal checkpoint with
`"checkpoint": {"load_universal": true}`, and must (a) hold exactly the saved weights and (b) reproduce
the next two 2-rank losses within fp32 tolerance: step 3 checks the weights, step 4 the restored Adam
moments and step count (a wrong optimizer state changes it at the 1e-3 level with lr 1e-2).
"""

from __future__ import annotations

import json

import pytest
import torch

from reformer_dist.checkpoint.reshard import SUPPORTED
from reformer_dist.cli.ckpt import main
from tests.distributed.ckpt_runs import run_worker, saved

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.mark.parametrize("load_stage", [2, 1])
def test_two_ranks_resume_on_one_after_reshard(tmp_path, capsys, load_stage):
    run = saved(2)
    r0, r1 = run.result(0), run.result(1)
    assert (r0["world_size"], r1["world_size"], r0["stage"]) == (2, 2, 2) and r0["losses"] == r1["losses"]

    uni = tmp_path / "universal"
    rc = main(["reshard", str(run.root), "--out", str(uni), "--to-stage", str(load_stage), "--workers", "1"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    summary = json.loads(out)
    assert (summary["source_zero_stage"], summary["source_world_size"], summary["step"]) == (2, 2, 2)
    assert (uni / "latest_universal").read_text().strip() == "global_step2"

    res = run_worker(1, ["resume", "--stage", str(load_stage), "--load", str(uni)], tmp_path / "resumed")
    r = res.result(0)
    assert (r["world_size"], r["stage"], sorted(r["losses"])) == (1, load_stage, [3, 4])
    live = torch.load(run.out / "live_state.pt")
    resumed = torch.load(res.out / "resumed_state.pt")
    assert resumed.keys() == live.keys()
    for k, v in live.items():
        assert torch.equal(resumed[k], v), f"{k}: loaded weights differ from the saved ones"
    for step in (3, 4):
        assert r["losses"][step] == pytest.approx(r0["losses"][step], rel=1e-5, abs=0), f"step {step}"


def test_unsupported_transitions_are_refused(tmp_path, capsys):
    run = saved(2)
    assert not SUPPORTED[(2, 3)] and not SUPPORTED[(3, 2)] and SUPPORTED[(2, 1)] and SUPPORTED[(3, 3)]
    rc = main(["reshard", str(run.root), "--out", str(tmp_path / "u"), "--to-stage", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and "ZeRO-2" in err and "ZeRO-3" in err and "Supported from ZeRO-2: ZeRO-1, ZeRO-2" in err
    assert not (tmp_path / "u").exists()
