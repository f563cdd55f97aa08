"""`reformer-ckpt consolidate` / `inspect` on real 2-rank gloo ZeRO checkpoints of a reversible ReformerLM.

The consolidated weights must equal the live model's fp32 parameters (gathered on the ranks right
after the save) bit for bit, for ZeRO-2, ZeRO-3 and ZeRO-1 with optimizer offload.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from reformer_dist import ReformerConfig, ReformerLM
from reformer_dist.cli.ckpt import main
from reformer_dist.ondisk import write_manifest
from tests.distributed.ckpt_runs import saved

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _checked(run, stage: int) -> dict[str, torch.Tensor]:
    """The run really had 2 ranks at this stage and they agree; returns the live fp32 state dict."""
    r0, r1 = run.result(0), run.result(1)
    assert (r0["world_size"], r1["world_size"], r0["rank"], r1["rank"]) == (2, 2, 0, 1)
    assert r0["stage"] == r1["stage"] == stage and r0["saved"] == "global_step2"
    assert r0["losses"] == r1["losses"] and sorted(r0["losses"]) == [1, 2, 3, 4]
    return torch.load(run.out / "live_state.pt")


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("stage, offload", [(2, False), (3, False), (1, True)])
def test_consolidate_equals_live_model(tmp_path, capsys, stage, offload):
    run = saved(stage, offload)
    live = _checked(run, stage)
    rc, out, err = _cli(capsys, "consolidate", run.root, "--out", tmp_path / "model")
    assert rc == 0, err
    summary = json.loads(out)
    assert (summary["zero_stage"], summary["world_size"], summary["step"]) == (stage, 2, 2)
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "checksums.json",
        "config.json",
        "model.safetensors",
    ]

    model = ReformerLM.from_pretrained(tmp_path / "model")
    assert model.cfg == ReformerConfig.load(run.root / "config.json")
    state = model.state_dict()
    assert state.keys() == live.keys()
    for k, v in live.items():
        assert torch.equal(state[k], v), f"{k} differs from the live model (ZeRO-{stage})"

    rc, out, err = _cli(capsys, "inspect", run.root, "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert (info["step"], info["zero_stage"], info["world_size"], info["dtype"]) == (2, stage, 2, "fp32")
    assert info["parameters"] == sum(v.numel() for v in live.values())
    assert info["size_bytes"] == sum(f.stat().st_size for f in (run.root / "global_step2").iterdir())
    assert info["offload_optimizer"] == ("cpu" if offload else None)


def test_bf16_sharded_output(tmp_path, capsys):
    run = saved(3)
    live = _checked(run, 3)
    rc, out, err = _cli(
        capsys,
        "consolidate",
        run.root / "global_step2",
        "--out",
        tmp_path / "m",
        "--dtype",
        "bf16",
        "--max-shard-size",
        "8KB",
    )
    assert rc == 0, err
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    shards = [n for n in names if n.startswith("model-0")]
    assert len(shards) >= 2 and "model.safetensors.index.json" in names and "model.safetensors" not in names
    model = ReformerLM.from_pretrained(tmp_path / "m")
    for k, v in live.items():
        assert torch.equal(model.state_dict()[k], v.to(torch.bfloat16).float()), k
    rc, out, _ = _cli(capsys, "inspect", tmp_path / "m", "--json")
    info = json.loads(out)
    assert (info["dtype"], info["zero_stage"], info["world_size"], info["checksums"]) == ("BF16", 3, 2, "verified")
    assert info["parameters"] == sum(v.numel() for v in live.values())


def _flip_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x10
    path.write_bytes(bytes(data))


def test_damaged_zero_shards_are_named(tmp_path, capsys):
    run = saved(2)
    _checked(run, 2)
    for damage in ("flip", "truncate"):
        ckpt = tmp_path / damage
        shutil.copytree(run.root, ckpt)
        victim = ckpt / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        if damage == "flip":
            _flip_byte(victim)
        else:
            victim.write_bytes(victim.read_bytes()[:-4096])
        rc, out, err = _cli(capsys, "consolidate", ckpt, "--out", tmp_path / f"out_{damage}")
        assert rc == 1 and str(victim) in err, (damage, err)
        assert not (tmp_path / f"out_{damage}").exists()  # nothing half-written


def test_trainer_layout_with_manifest(tmp_path, capsys):
    """reformer-train's layout: step_XXXXXXXX tags, run_config.json with the model section, MANIFEST.json."""
    run = saved(2)
    live = _checked(run, 2)
    root = tmp_path / "checkpoints"
    shutil.copytree(run.root / "global_step2", root / "step_00000002")
    (root / "latest").write_text("step_00000002")
    cfg = json.loads((run.root / "config.json").read_text())
    (root / "step_00000002" / "run_config.json").write_text(json.dumps({"config": {"model": cfg}, "plan": {}}))
    write_manifest(root / "step_00000002", extra={"step": 2, "world_size": 2})
    rc, out, err = _cli(capsys, "consolidate", root, "--out", tmp_path / "m")
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["verified"].startswith("MANIFEST.json") and summary["config_from"].endswith("run_config.json")
    # this run_config.json has no [data]: the weights are written, without a record of the tokenizer, and it says so
    assert summary["tokenizer"] is None and not (tmp_path / "m" / "training_data.json").exists()
    assert "training_data.json not written" in summary["tokenizer_note"] and "warning: training_data.json" in err
    state = ReformerLM.from_pretrained(tmp_path / "m").state_dict()
    assert state.keys() == live.keys()
    assert all(torch.equal(state[k], v) for k, v in live.items())

    victim = root / "step_00000002" / "mp_rank_00_model_states.pt"
    _flip_byte(victim)
    rc, out, err = _cli(capsys, "consolidate", root, "--out", tmp_path / "m2")
    assert rc == 1 and str(victim) in err and "SHA-256" in err
