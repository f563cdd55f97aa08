"""model.head_groups: the reversible attention block one head group at a time equals the ungrouped model.

Heads hash, sort and attend exactly as without groups (rotations are drawn for all heads and sliced); only the
sums over heads (the output projection, the input gradient) are associated differently, so float64 results
agree to rounding (1e-12 relative, observed ~2e-15) and the loss is usually bit-equal. Memory is in
test_memory.py.
"""

from __future__ import annotations

import pytest
import torch

from reformer_dist import ReformerConfig, ReformerLM
from reformer_dist.model.head_groups import group_ranges

L = 200  # not a multiple of the chunk lengths: the model pads


def make(layers: list[str], groups: int, dtype=torch.float64, **kw) -> ReformerLM:
    base = dict(
        vocab_size=40,
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
        ff_chunk_len=48,
        loss_chunk_len=40,
        head_groups=groups,
        attention_backend="blockwise",
    )
    base.update(kw)
    torch.manual_seed(0)
    return ReformerLM(ReformerConfig(**base)).to(dtype)


def step(model: ReformerLM, inputs: str = "", length: int = L, autocast: bool = False):
    """(loss, {name: grad}) of one training step on fixed data; inputs: 'docs' and/or 'pad'."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (2, length), generator=g)
    kw = {}
    if "docs" in inputs:
        d = torch.zeros(2, length, dtype=torch.long)
        d[:, 70:] = 1
        d[1, 150:] = 2
        kw["document_ids"] = d
    if "pad" in inputs:
        mask = torch.ones(2, length, dtype=torch.long)
        mask[1, 180:] = 0
        kw["attention_mask"] = mask
    torch.manual_seed(5)  # dropout
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model.loss(ids, hash_seed=3, **kw)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def assert_same(ref, got, rtol: float) -> None:
    (l0, g0), (l1, g1) = ref, got
    assert abs(l1.item() - l0.item()) <= rtol * abs(l0.item()), (l0.item(), l1.item())
    assert g0.keys() == g1.keys()
    for k in g0:
        scale = g0[k].abs().max().item()
        assert scale > 0, k  # every parameter gets a gradient: the comparison is not vacuous
        err = (g1[k] - g0[k]).abs().max().item()
        assert err <= rtol * scale, (k, err, scale)


@pytest.mark.parametrize("layers", [["lsh", "lsh"], ["local", "local"], ["full", "lsh"]])
@pytest.mark.parametrize("inputs", ["", "docs,pad"])
def test_grouped_equals_ungrouped_float64(layers, inputs):
    ref = step(make(layers, 1), inputs)
    for groups in (2, 4):
        assert_same(ref, step(make(layers, groups), inputs), rtol=1e-12)


def test_grouped_equals_ungrouped_with_dropout():
    """One dropout mask per layer output, the same as without groups (replayed in the backward)."""
    ref = step(make(["lsh", "local"], 1, dropout=0.2))
    assert_same(ref, step(make(["lsh", "local"], 4, dropout=0.2)), rtol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "blockwise"])
def test_every_pytorch_core(backend):
    ref = step(make(["lsh", "local"], 1, attention_backend=backend), "pad")
    assert_same(ref, step(make(["lsh", "local"], 2, attention_backend=backend), "pad"), rtol=1e-12)


def test_triton_core_fp32():
    """The fused core (Triton's interpreter on CPU) in fp32: equal within float rounding."""
    pytest.importorskip("triton")
    ref = step(make(["lsh"], 1, dtype=torch.float32, attention_backend="triton"), length=48)
    assert_same(ref, step(make(["lsh"], 2, dtype=torch.float32, attention_backend="triton"), length=48), rtol=1e-5)


def test_fp32_within_rounding():
    ref = step(make(["lsh", "local", "full"], 1, dtype=torch.float32), "docs")
    assert_same(ref, step(make(["lsh", "local", "full"], 4, dtype=torch.float32), "docs"), rtol=1e-5)


def test_bf16_autocast_rebuilds_the_streams():
    """Under bf16 autocast the groups' shares are added to and subtracted from the fp32 stream in the same
    pieces, so the rebuilt inputs do not drift: gradients stay as close to the fp32 step as ungrouped ones."""
    fp32 = step(make(["lsh", "local"], 1, dtype=torch.float32))[1]
    flat = torch.cat([g.flatten() for g in fp32.values()])
    for groups in (1, 4):
        got = step(make(["lsh", "local"], groups, dtype=torch.float32), autocast=True)[1]
        cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in got.values()]), flat, dim=0)
        assert cos > 0.999, (groups, cos)


def test_default_by_length_and_ulysses():
    cfg = ReformerConfig(n_heads=8, d_head=32, d_model=256)
    assert cfg.head_groups == 0
    assert cfg.head_groups_for(16384) == 1 and cfg.head_groups_for(65535) == 1
    assert cfg.head_groups_for(65536) == 8 and cfg.head_groups_for(1 << 24) == 8
    assert cfg.head_groups_for(65536, ulysses=2) == 4  # one head per group on each of the 2 ranks
    fixed = ReformerConfig(n_heads=8, d_head=32, d_model=256, head_groups=4)
    assert fixed.head_groups_for(1024) == 4 and fixed.head_groups_for(1 << 20, ulysses=2) == 4
    with pytest.raises(ValueError, match="head_groups: 4 must divide the 2 heads of each of the 4 Ulysses ranks"):
        fixed.head_groups_for(1024, ulysses=4)
    with pytest.raises(ValueError, match="head_groups"):
        ReformerConfig(n_heads=8, d_head=32, d_model=256, head_groups=3)
    assert group_ranges(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]


def test_default_groups_a_long_sequence():
    """Without model.head_groups a sequence of >= 65536 tokens runs grouped, and still equals G = 1."""
    kw = dict(
        n_heads=2,
        d_head=4,
        d_model=8,
        d_ff=8,
        vocab_size=40,
        n_layers=1,
        attn_layers=["local"],
        chunk_len=64,
        axial_pos_shape=[256, 256],
        ff_chunk_len=16384,
        loss_chunk_len=16384,
    )
    assert ReformerConfig(**kw).head_groups_for(65536) == 2
    ref = step(make(["local"], 1, **kw), length=65536)
    assert_same(ref, step(make(["local"], 0, **kw), length=65536), rtol=1e-12)
