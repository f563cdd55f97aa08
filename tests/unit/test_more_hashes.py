"""Evaluating with more (or fewer) LSH hash rounds than trained: rotations, the union merge, the model API,
and the trainer's ``eval.n_hashes`` (float64 where numbers are compared)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reformer_dist import ReformerConfig, ReformerLM
from reformer_dist.model.hashing import make_rotations
from reformer_dist.model.lsh_attention import lsh_attention
from tests.unit.lsh_reference import dense_lsh_reference

REPO = Path(__file__).resolve().parents[2]


def test_rounds_are_prefix_stable():
    """Round r is the same rotation at every R > r, and R = trained gives the training draw bit for bit."""
    trained = make_rotations(5, 3, 8, 2, [4, 8])
    assert torch.equal(make_rotations(5, 3, 8, 2, [4, 8], trained_hashes=2), trained)
    r1 = make_rotations(5, 3, 8, 1, [4, 8], trained_hashes=2)
    r4 = make_rotations(5, 3, 8, 4, [4, 8], trained_hashes=2)
    r8 = make_rotations(5, 3, 8, 8, [4, 8], trained_hashes=2)
    assert r4.shape == (3, 8, 4, 2 + 4) and r8.shape == (3, 8, 8, 6)
    assert torch.equal(r1, trained[:, :, :1])
    assert torch.equal(r4[:, :, :2], trained) and torch.equal(r8[:, :, :4], r4)
    assert not torch.equal(r4[:, :, 2], r4[:, :, 3]) and not torch.equal(r4[:, :, 2], trained[:, :, 0])
    # without trained_hashes the draw is today's (what HF does too: a fresh tensor per shape)
    assert not torch.equal(make_rotations(5, 3, 8, 4, [4, 8])[:, :, :2], trained)


def _support(out: torch.Tensor) -> torch.Tensor:
    """Which other keys a query's merged softmax gives weight to (one-hot values: out = the weights). The
    query itself is left out: it gets weight only while nothing else is visible (the self rule)."""
    w = out[0, :, 0, :] > 0
    return w & ~torch.eye(w.shape[0], dtype=torch.bool)


@pytest.mark.parametrize("backend", ["reference", "blockwise"])
def test_merge_is_over_the_union_of_rounds(backend):
    """R = 1, 2, 4 with the training rounds kept: the output equals the dense oracle's softmax over the union
    of every round's window occurrences, and the union only grows (except for queries whose round-0 chunk
    looks back across the wrap to the last round, which is another round when R changes)."""
    g = torch.Generator().manual_seed(21)
    length, m, factors, trained = 64, 4, [8], 2
    # one-hot values (head size L, like qk) make the output row the attention weights themselves
    qk = torch.randn(1, length, 1, length, dtype=torch.float64, generator=g)
    v = torch.eye(length, dtype=torch.float64).view(1, length, 1, length)
    supports, counts = {}, {}
    for r in (1, 2, 4):
        rot = make_rotations(3, 1, length, r, factors, trained_hashes=trained)
        out, buckets = lsh_attention(
            qk,
            v,
            rot,
            factors,
            chunk_len=m,
            n_chunks_before=1,
            n_chunks_after=0,
            causal=True,
            return_buckets=True,
            backend=backend,
        )
        ref = dense_lsh_reference(qk, v, buckets, chunk_len=m, n_chunks_before=1, n_chunks_after=0, causal=True)
        assert (out - ref).abs().max().item() < 1e-10
        rows = out[0, :, 0, :].sum(-1)
        assert torch.allclose(rows, torch.ones_like(rows))  # weights of a softmax
        supports[r], counts[r] = _support(out), int(_support(out).sum())
        if r == 1:
            first = buckets  # round 0's buckets are the same at every R
        else:
            assert torch.equal(buckets[:, :, 0], first[:, :, 0])
    assert counts[1] < counts[2] < counts[4]
    # queries in round 0's first chunk look back into the last round, which changes with R
    rank0 = torch.argsort(torch.argsort(first[0, 0, 0].long() * length + torch.arange(length)))
    stable = rank0 >= m
    for a, b in ((1, 2), (2, 4)):
        assert (supports[a][stable] <= supports[b][stable]).all()


def cfg(**kw) -> ReformerConfig:
    base = dict(
        vocab_size=32,
        d_model=16,
        n_heads=2,
        d_head=8,
        d_ff=32,
        n_layers=2,
        attn_layers=["lsh", "local"],
        n_hashes=2,
        chunk_len=8,
        local_chunk_len=8,
        axial_pos_shape=[8, 16],
    )
    base.update(kw)
    return ReformerConfig(**base)


def test_model_n_hashes_argument():
    torch.manual_seed(0)
    m = ReformerLM(cfg()).double().eval()
    ids = torch.randint(0, 32, (2, 64))
    base = m(ids, hash_seed=3)
    assert torch.equal(m(ids, hash_seed=3, n_hashes=2), base)  # the trained rounds, bit for bit
    four = m(ids, hash_seed=3, n_hashes=4)
    assert (four - base).abs().max() > 1e-3  # more rounds see more keys
    assert torch.isfinite(m.loss(ids, hash_seed=3, n_hashes=4))
    assert torch.equal(
        m.generate(ids[:, :5], 3, temperature=0, n_hashes=4, use_cache=False),
        m.generate(ids[:, :5], 3, temperature=0, n_hashes=4),
    )
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="n_hashes"):
            m(ids, n_hashes=bad)


def test_one_chunk_is_independent_of_the_rounds():
    """chunk_len >= length: LSH layers are plain attention, so any R gives the same logits."""
    torch.manual_seed(0)
    m = ReformerLM(cfg(chunk_len=64, local_chunk_len=64)).double().eval()
    ids = torch.randint(0, 32, (2, 50))
    base = m(ids)
    for r in (1, 2, 4, 8):
        assert torch.equal(m(ids, n_hashes=r), base)


def test_hf_export_ignores_evaluation_rounds(tmp_path):
    """The round count of a call is not architecture: the exported HF config keeps model.n_hashes."""
    from reformer_dist.checkpoint.hf_adapter import to_hf_config

    c = cfg()
    assert to_hf_config(c)["num_hashes"] == 2


@pytest.mark.slow
def test_trainer_reports_both_losses(tmp_path):
    """eval.n_hashes: each eval record and log line carries the loss at the trained rounds and at eval.n_hashes."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    sets = [
        "model.d_model=32",
        "model.d_head=16",
        "model.d_ff=64",
        "model.chunk_len=16",
        "model.n_hashes=1",
        "data.seq_len=128",
        "train.micro_batch=2",
        "train.max_steps=2",
        "train.warmup_steps=1",
        "eval.every=1",
        "eval.batches=1",
        "eval.n_hashes=4",
        "checkpoint.at_end=false",
        "output.save_model=false",
        "output.sample_tokens=0",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        f"output.dir={tmp_path}",
    ]
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "reformer_dist.cli.train",
            "--config",
            str(REPO / "configs/quickstart.toml"),
            *[a for s in sets for a in ("--set", s)],
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [1, 2]
    for r in evals:
        assert r["eval_n_hashes"] == 4 and r["eval_loss"] > 0 and r["eval_loss_n_hashes"] > 0
        assert r["eval_loss"] != r["eval_loss_n_hashes"]  # two forward passes, not one number twice
        assert f"loss with 4 hash rounds {r['eval_loss_n_hashes']:.4f} (trained with 1)" in p.stderr
