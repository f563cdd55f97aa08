"""Ulysses sequence parallelism in real gloo processes vs the single-process model (fp32)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reformer_dist import ReformerConfig, ReformerLM

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
WORKER = Path(__file__).with_name("sp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sp(
    tmp_path: Path,
    layers: list[str],
    nproc: int,
    sp_size: int,
    dp: int,
    ulysses_size: int | None = None,
    data: torch.Tensor | None = None,
    **cfg_kw,
):
    kw = dict(
        vocab_size=50,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_ff=64,
        n_layers=len(layers),
        attn_layers=layers,
        n_hashes=2,
        chunk_len=16,
        local_chunk_len=8,
        axial_pos_shape=[16, 16],
        ff_chunk_len=32,
        loss_chunk_len=24,
        dropout=0.0,
    )
    kw.update(cfg_kw)
    cfg = ReformerConfig(**kw)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    torch.manual_seed(1)
    model = ReformerLM(cfg)
    torch.save(model.state_dict(), tmp_path / "init.pt")
    data = torch.randint(0, 50, (dp, 129)) if data is None else data
    torch.save(data, tmp_path / "data.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        str(WORKER),
        str(tmp_path),
        ",".join(layers),
        str(sp_size),
        str(ulysses_size or sp_size),
    ]
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
    return res, ref_losses, ref_grads, model


def assert_grads_close(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-7, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("layers", [["lsh", "lsh"], ["local", "local"], ["lsh", "local", "full"]])
def test_sp2_equals_single_process(tmp_path, layers):
    res, ref_losses, ref_grads, _ = run_sp(tmp_path, layers, nproc=2, sp_size=2, dp=1)
    assert res["world_size"] == 2
    # every rank reports the loss of the whole sequence
    torch.testing.assert_close(res["losses"], torch.tensor([ref_losses[0]] * 2), rtol=1e-5, atol=0)
    assert_grads_close(res["grads"], ref_grads)


def test_sp2_x_dp2_equals_single_process(tmp_path):
    res, ref_losses, ref_grads, _ = run_sp(tmp_path, ["lsh", "local"], nproc=4, sp_size=2, dp=2)
    assert res["world_size"] == 4
    torch.testing.assert_close(
        res["losses"], torch.tensor([ref_losses[0]] * 2 + [ref_losses[1]] * 2), rtol=1e-5, atol=0
    )
    assert_grads_close(res["grads"], ref_grads)


def skewed_window(seed: int) -> torch.Tensor:
    """Mostly one token, so most positions hash to one bucket whose run of the sorted order spans ranks."""
    g = torch.Generator().manual_seed(seed)
    data = torch.full((1, 129), 7)
    rare = torch.rand(1, 129, generator=g) < 0.2
    data[rare] = torch.randint(0, 50, (int(rare.sum()),), generator=g)
    return data


@pytest.mark.parametrize("sp_size,ulysses_size", [(2, 1), (4, 1), (4, 2)])
def test_bucket_sharded_sp_equals_single_process(tmp_path, sp_size, ulysses_size):
    """Bucket sharding (K = sp/ulysses ranks over the sorted order), alone and 2D with Ulysses: LSH + local layers,
    reversible, causal, 3 hash rounds, one bucket holding most tokens (ties straddle rank boundaries)."""
    data = skewed_window(sp_size)
    res, ref_losses, ref_grads, model = run_sp(
        tmp_path,
        ["lsh", "local", "lsh"],
        nproc=sp_size,
        sp_size=sp_size,
        dp=1,
        ulysses_size=ulysses_size,
        data=data,
        n_hashes=3,
        axial_norm_std=1e-3,
    )
    # the inputs really are skewed: one bucket of the first layer holds most tokens
    from reformer_dist.model.hashing import hash_buckets, layer_seed, make_rotations

    blk = model.stack.blocks[0].f
    with torch.no_grad():
        x = model.tok_emb(data[:, :-1]) + model.pos_emb(torch.arange(128))
        qk = blk.attn.query_key(blk.norm(x)).view(1, 128, 4, 8)
    factors = model.cfg.bucket_factors(128)
    buckets = hash_buckets(qk, make_rotations(layer_seed(11, 0), 4, 8, 3, factors), factors)
    top = torch.stack([torch.bincount(buckets[0, h, r].long()).max() for h in range(4) for r in range(3)])
    assert top.max() > 64, top  # > half of the 128 tokens in one bucket: its run crosses rank boundaries
    assert res["world_size"] == sp_size
    torch.testing.assert_close(res["losses"], torch.tensor([ref_losses[0]] * sp_size), rtol=1e-5, atol=0)
    assert_grads_close(res["grads"], ref_grads)
    # bytes handed to the collectives: forward + the reversible backward's recompute of each layer, summed over
    # ranks (halo copies are data-dependent per rank, exact in total)
    from reformer_dist.parallel.bucket import forward_bytes

    k = sp_size // ulysses_size
    common = dict(batch=1, heads=4 // ulysses_size, tokens=128 // k, head_dim=8, elem=4, ranks=k)
    expected = 0
    for rank in range(sp_size):
        kr = rank // ulysses_size  # the bucket rank of global rank k*U + u
        lsh = forward_bytes(
            "lsh",
            **common,
            rank=kr,
            n_hashes=3,
            n_buckets=math.prod(factors),
            chunk_len=16,
            n_chunks_before=1,
            n_chunks_after=0,
        )
        local = forward_bytes("local", **common, rank=kr, chunk_len=8, n_chunks_before=1, n_chunks_after=0)
        expected += 2 * (2 * lsh + local)
    assert res["bytes_sent"].sum().item() == expected, (res["bytes_sent"], expected)


def test_documents_stay_apart_under_ulysses_sp2(tmp_path):
    """float64, SP=2: changing every token of one packed document changes no logit of the others, bit for bit
    (LSH and local layers, 3 rounds, positions restarting per document); the changed document does change."""
    layers = ["lsh", "local", "lsh"]
    cfg = ReformerConfig(
        vocab_size=50,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_ff=64,
        n_layers=3,
        attn_layers=layers,
        n_hashes=3,
        chunk_len=16,
        local_chunk_len=8,
        axial_pos_shape=[16, 16],
    )
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    torch.manual_seed(1)
    torch.save(ReformerLM(cfg).double().state_dict(), tmp_path / "init.pt")
    g = torch.Generator().manual_seed(3)
    lengths = [37, 50, 41]  # 128 tokens, document 1 straddles the two ranks' slices
    window = torch.cat([torch.cat([torch.randint(2, 50, (n - 1,), generator=g), torch.tensor([1])]) for n in lengths])
    other = window.clone()
    s, e = lengths[0], lengths[0] + lengths[1] - 1
    other[s:e] = torch.randint(2, 50, (e - s,), generator=g)
    torch.save(torch.stack([window, other]), tmp_path / "windows.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(WORKER.with_name("docs_worker.py")),
        str(tmp_path),
        "2",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    result = tmp_path / "logits.pt"
    assert result.exists(), f"workers wrote no result (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    a, b = torch.load(result)
    keep = torch.ones(128, dtype=torch.bool)
    keep[s : e + 1] = False
    assert torch.equal(a[0, keep], b[0, keep])
    assert not torch.allclose(a[0, s + 1 : e], b[0, s + 1 : e])


def ungrouped(model: ReformerLM) -> ReformerLM:
    """The same weights with model.head_groups = 1 (all heads at once)."""
    cfg = ReformerConfig(**{**model.cfg.to_dict(), "head_groups": 1})
    out = ReformerLM(cfg).to(next(model.parameters()).dtype)
    out.load_state_dict(model.state_dict())
    return out


def test_head_groups_under_ulysses_sp2_float64(tmp_path):
    """model.head_groups = 2 under Ulysses SP=2 (one head of each group per rank), float64, packed documents:
    every gradient equals the single-process ungrouped model's to rounding (1e-10 relative)."""
    layers = ["lsh", "local", "full"]
    (tmp_path / "opts.json").write_text(json.dumps({"float64": True, "eod_id": 1}))
    g = torch.Generator().manual_seed(4)
    data = torch.randint(2, 50, (1, 129), generator=g)
    data[0, [30, 61, 100]] = 1  # document ends: 4 documents, two of them straddling the ranks' slices
    res, _, _, model = run_sp(tmp_path, layers, nproc=2, sp_size=2, dp=1, data=data, head_groups=2)
    assert model.cfg.head_groups_for(128, ulysses=2) == 2
    from reformer_dist.model.documents import document_ids

    ref = ungrouped(model).double()
    w = data[0]
    loss = ref(w[:-1].unsqueeze(0), w[1:].unsqueeze(0), hash_seed=11, document_ids=document_ids(w[:-1].unsqueeze(0), 1))
    loss.backward()
    torch.testing.assert_close(res["losses"], torch.tensor([loss.item()] * 2, dtype=torch.float32), rtol=1e-6, atol=0)
    for k, p in ref.named_parameters():
        assert res["grads"][k].dtype == torch.float64
        scale = p.grad.abs().max().item()
        assert scale > 0, k
        assert (res["grads"][k] - p.grad).abs().max().item() <= 1e-10 * scale, k


def test_head_groups_under_bucket_sharded_sp2(tmp_path):
    """model.head_groups = 2 with bucket sharding (K = 2 ranks over the sorted order), fp32: equal to the
    single-process ungrouped model within float rounding."""
    data = skewed_window(2)
    res, _, _, model = run_sp(
        tmp_path,
        ["lsh", "local", "lsh"],
        nproc=2,
        sp_size=2,
        dp=1,
        ulysses_size=1,
        data=data,
        n_hashes=3,
        axial_norm_std=1e-3,
        head_groups=2,
    )
    ref = ungrouped(model)
    loss = ref(data[0, :-1].unsqueeze(0), data[0, 1:].unsqueeze(0), hash_seed=11)
    loss.backward()
    torch.testing.assert_close(res["losses"], torch.tensor([loss.item()] * 2), rtol=1e-5, atol=0)
    assert_grads_close(res["grads"], {k: p.grad for k, p in ref.named_parameters()})
