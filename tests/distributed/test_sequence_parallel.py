"""Ulysses sequence parallelism in real gloo processes vs the single-process model (fp32)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reformer_dist import ReformerConfig, ReformerLM

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).with_name("sp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sp(tmp_path: Path, layers: list[str], nproc: int, sp_size: int, dp: int):
    cfg = ReformerConfig(vocab_size=50, d_model=32, n_heads=4, d_head=8, d_ff=64, n_layers=len(layers),
                         attn_layers=layers, n_hashes=2, chunk_len=16, local_chunk_len=8, axial_pos_shape=[16, 16],
                         ff_chunk_len=32, loss_chunk_len=24, dropout=0.0)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    torch.manual_seed(1)
    model = ReformerLM(cfg)
    torch.save(model.state_dict(), tmp_path / "init.pt")
    data = torch.randint(0, 50, (dp, 129))
    torch.save(data, tmp_path / "data.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(WORKER), str(tmp_path), ",".join(layers), str(sp_size)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    result = tmp_path / "result.pt"
    assert result.exists(), f"workers wrote no result (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    res = torch.load(result)
    # single-process reference: mean over the DP windows of each window's full-sequence loss/gradient
    ref_losses, ref_grads = [], None
    for w in data:
        model.zero_grad(set_to_none=True)
        loss = model(w[:-1].unsqueeze(0), w[1:].unsqueeze(0), hash_seed=11)
        loss.backward()
        ref_losses.append(loss.item())
        g = {k: p.grad.clone() / dp for k, p in model.named_parameters()}
        ref_grads = g if ref_grads is None else {k: ref_grads[k] + g[k] for k in g}
    return res, ref_losses, ref_grads


def assert_grads_close(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("layers", [["lsh", "lsh"], ["local", "local"], ["lsh", "local", "full"]])
def test_sp2_equals_single_process(tmp_path, layers):
    res, ref_losses, ref_grads = run_sp(tmp_path, layers, nproc=2, sp_size=2, dp=1)
    assert res["world_size"] == 2
    # every rank reports the loss of the whole sequence
    torch.testing.assert_close(res["losses"], torch.tensor([ref_losses[0]] * 2), rtol=1e-5, atol=0)
    assert_grads_close(res["grads"], ref_grads)


def test_sp2_x_dp2_equals_single_process(tmp_path):
    res, ref_losses, ref_grads = run_sp(tmp_path, ["lsh", "local"], nproc=4, sp_size=2, dp=2)
    assert res["world_size"] == 4
    torch.testing.assert_close(res["losses"], torch.tensor([ref_losses[0]] * 2 + [ref_losses[1]] * 2), rtol=1e-5,
                               atol=0)
    assert_grads_close(res["grads"], ref_grads)
