"""Memory bounds derived from the design, counted exactly (saved-tensor hooks, tracked allocations), never timed.

Design (fp32, d = n_heads * d_head, R rounds, H heads; per token of sequence):
- an LSH layer's forward saves qk, v and its output (3 d floats), the sort permutation (R*H int32),
  the merged log-sum-exp as hi + lo (2 H floats) and LayerNorm's mean and rstd (2 floats): its normalised input is a
  recipe over the stream, not values (``blocks._NormRecompute``);
- a training step's peak holds the two streams and their gradients (4 d_model), plus one layer's
  attention backward: qk, v, out, d(out), d(qk), d(v) (6 d): 10 * d_model floats when d == d_model;
  independent of depth. With model.head_groups = G only one group's share of the latter exists: 6 d / G.
"""

from __future__ import annotations

import pytest
import torch

from reformer_dist import ReformerConfig, ReformerLM
from reformer_dist.kernels import blockwise
from reformer_dist.memtrack import AllocationTracker
from reformer_dist.model import hashing
from reformer_dist.model.blocks import AttentionBlock
from reformer_dist.model.context import AttentionContext
from reformer_dist.model.hashing import hash_buckets, make_rotations, sort_buckets

D, H, R = 64, 4, 2


def cfg(n_layers: int = 2, **kw) -> ReformerConfig:
    base = dict(
        vocab_size=32,
        d_model=D,
        n_heads=H,
        d_head=D // H,
        d_ff=2 * D,
        n_layers=n_layers,
        n_hashes=R,
        chunk_len=16,
        axial_pos_shape=[64, 128],
        ff_chunk_len=256,
        loss_chunk_len=256,
        attention_backend="blockwise",
    )
    base.update(kw)
    return ReformerConfig(**base)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # cap the block temporaries of the attention core and of hashing well below these small activations
    monkeypatch.setattr(blockwise, "_BLOCK_ELEMS", 1 << 14)
    monkeypatch.setattr(hashing, "_HASH_BLOCK_ELEMS", 1 << 12)


def test_lsh_layer_saves_only_what_backward_cannot_recompute():
    torch.manual_seed(0)
    block = AttentionBlock(cfg(), 0)
    per_token = []
    for length in (1024, 4096):
        x = torch.randn(1, length, D, requires_grad=True)
        with AllocationTracker() as t:
            out = block(x, AttentionContext(hash_seed=1))
            kept = t.current - out.untyped_storage().nbytes()  # what the graph holds for backward
        out.sum().backward()  # the graph is usable
        per_token.append(kept / length)
    design = 4 * 3 * D + 4 * R * H + 4 * 2 * H + 4 * 2  # + lse as hi and lo (exact for self-only rows)
    assert per_token[1] <= design * 1.01, (per_token, design)
    assert per_token[1] >= 4 * 3 * D  # the count sees the tensors (the bound is not vacuous)
    assert abs(per_token[0] - per_token[1]) <= 0.03 * design, per_token  # linear in length


def test_training_step_peak_is_linear_flat_in_depth_and_below_design():
    peaks = {}
    for layers in (2, 4):
        for length in (1024, 2048):
            torch.manual_seed(0)
            model = ReformerLM(cfg(n_layers=layers))
            ids = torch.randint(0, 32, (1, length))
            with AllocationTracker() as t:
                model.loss(ids, hash_seed=3).backward()
            peaks[layers, length] = t.peak_bytes
    slope = (peaks[2, 2048] - peaks[2, 1024]) / 1024
    design = 4 * 10 * D + 4 * (R * H + 3 * H + 2)  # + int32 permutation, lse (hi, lo), delta, LayerNorm stats
    assert slope <= design * 1.05, (slope, design)
    assert slope >= 4 * 8 * D  # the tracker sees the activations
    # deeper stacks add parameters and their gradients, not activations
    params = sum(p.numel() for p in ReformerLM(cfg(n_layers=4)).parameters()) - sum(
        p.numel() for p in ReformerLM(cfg(n_layers=2)).parameters()
    )
    for length in (1024, 2048):
        assert peaks[4, length] - peaks[2, length] <= 4 * 2 * params + 64 * 1024, (length, peaks)


def test_hashing_transient_per_token_is_flat(monkeypatch):
    """The automatic bucket rule grows the rotation columns with sqrt(L); memory per token must not grow."""
    c = ReformerConfig(d_model=8 * 16, n_heads=8, d_head=16, chunk_len=8, n_hashes=2, axial_pos_shape=[256, 256])
    per_token, cols = [], []
    for length in (4096, 16384):
        factors = c.bucket_factors(length)
        cols.append(sum(f // 2 for f in factors))
        x = torch.randn(1, length, 8, 16)
        rot = make_rotations(0, 8, 16, 2, factors)
        with AllocationTracker() as t:
            perm = sort_buckets(hash_buckets(x, rot, factors))
        assert perm.dtype == torch.int32
        per_token.append(t.peak_bytes / length)
    assert cols[1] > cols[0]  # the test exercises the growing number of bucket columns
    assert abs(per_token[1] - per_token[0]) <= 0.1 * per_token[0], per_token


def test_bf16_autocast_step_is_finite_and_close_to_fp32():
    """bf16 compute with fp32 streams is a first-class path: a training step on CPU at a small length."""
    torch.manual_seed(0)
    model = ReformerLM(cfg(n_layers=2, attn_layers=["lsh", "local"]))
    ids = torch.randint(0, 32, (1, 512))
    losses, grads = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model.loss(ids, hash_seed=2)
        loss.backward()
        losses[dtype] = loss.item()
        grads[dtype] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert abs(losses[torch.bfloat16] - losses[torch.float32]) < 0.02 * losses[torch.float32]
    cos = torch.nn.functional.cosine_similarity(grads[torch.bfloat16], grads[torch.float32], dim=0)
    assert cos > 0.99, cos


def test_head_groups_peak_is_linear_below_design_and_flat_in_depth():
    """model.head_groups = G: the attention term of the peak becomes 6 d / G floats per token (one head group's
    qk, v, out, d(out), d(qk), d(v)); the streams and their gradients (4 d_model floats) stay, so beyond a few
    groups the peak per token flattens towards them. Exact tracked allocations, fp32."""
    slopes, peaks = {}, {}
    for groups, layers in ((2, 2), (4, 2), (4, 4)):  # G = 1: test_training_step_peak_is_linear_flat_in_depth...
        for length in (1024, 2048):
            torch.manual_seed(0)
            model = ReformerLM(cfg(n_layers=layers, head_groups=groups))
            ids = torch.randint(0, 32, (1, length))
            model.loss(ids[:, :256], hash_seed=3).backward()  # parameter gradients exist before the count
            with AllocationTracker() as t:
                model.loss(ids, hash_seed=3).backward()
            peaks[groups, layers, length] = t.peak_bytes
        slopes[groups, layers] = (peaks[groups, layers, 2048] - peaks[groups, layers, 1024]) / 1024
    for g in (2, 4):
        ints = 4 * (R * H + 3 * H) / g + 4 * 4  # LayerNorm statistics once per input projection
        design = 4 * (4 * D + 6 * D / g) + ints
        assert 4 * 4 * D <= slopes[g, 2] <= design * 1.05, (g, slopes[g, 2], design)
    # the term really divides by G: halving a group's heads removes half of it
    drop = slopes[2, 2] - slopes[4, 2]
    expect = 4 * 6 * D * (1 / 2 - 1 / 4) + 4 * (R * H + 3 * H) * (1 / 2 - 1 / 4)
    assert abs(drop - expect) <= 0.15 * expect, (drop, expect)
    # deeper stacks add parameters and their gradients, not activations
    params = sum(p.numel() for p in ReformerLM(cfg(n_layers=4)).parameters()) - sum(
        p.numel() for p in ReformerLM(cfg(n_layers=2)).parameters()
    )
    for length in (1024, 2048):
        assert peaks[4, 4, length] - peaks[4, 2, length] <= 4 * 2 * params + 64 * 1024, (length, peaks)
