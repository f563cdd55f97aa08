"""LSH attention vs an explicit dense masked reference built from the same buckets (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from reformer_dist.kernels.logits import normalize_keys
from reformer_dist.model.hashing import hash_buckets, make_rotations, sort_buckets
from reformer_dist.model.lsh_attention import lsh_attention
from tests.unit.lsh_reference import dense_lsh_reference

CASES = [
    # B, H, L, D, chunk, rounds, factors, n_chunks_before, n_chunks_after, causal
    (1, 1, 32, 8, 8, 1, [4], 1, 0, True),
    (2, 2, 64, 16, 8, 2, [8], 1, 0, True),
    (1, 3, 48, 8, 8, 3, [2, 4], 1, 0, True),
    (2, 2, 64, 8, 16, 4, [4, 2], 1, 0, False),
    (1, 2, 64, 8, 8, 2, [8], 2, 1, False),
    (1, 2, 96, 8, 8, 4, [4, 4], 1, 0, True),
    (1, 1, 16, 4, 4, 2, [2, 2], 0, 0, True),
]


@pytest.mark.parametrize("b,h,l,d,m,r,factors,nb,na,causal", CASES)
@pytest.mark.parametrize("variant", ["plain", "dup_correction", "padded", "same_bucket"])
@pytest.mark.parametrize("backend", ["reference", "blockwise"])
def test_lsh_matches_dense_reference(b, h, l, d, m, r, factors, nb, na, causal, variant, backend):
    g = torch.Generator().manual_seed(hash((b, h, l, d, m, r, variant)) % 2**31)
    qk = torch.randn(b, l, h, d, dtype=torch.float64, generator=g)
    v = torch.randn(b, l, h, d, dtype=torch.float64, generator=g)
    rot = make_rotations(7, h, d, r, factors)
    key_valid = None
    if variant == "padded":
        key_valid = torch.ones(b, l, dtype=torch.bool)
        key_valid[:, l - m // 2 - 1 :] = False
    kwargs = dict(chunk_len=m, n_chunks_before=nb, n_chunks_after=na, causal=causal, key_valid=key_valid)
    out, buckets = lsh_attention(
        qk,
        v,
        rot,
        factors,
        **kwargs,
        same_bucket_only=(variant == "same_bucket"),
        allow_duplicate_attention=(variant != "dup_correction"),
        return_buckets=True,
        backend=backend,
    )
    ref = dense_lsh_reference(
        qk,
        v,
        buckets,
        **kwargs,
        same_bucket_only=(variant == "same_bucket"),
        allow_duplicate_attention=(variant != "dup_correction"),
    )
    assert out.shape == (b, l, h, d)
    assert (out - ref).abs().max().item() < 1e-10
    if variant == "padded":  # padding went to its own bucket, sorted after every real token
        assert (buckets[:, :, :, l - m // 2 - 1 :] == math.prod(factors)).all()


def test_duplicate_correction_changes_result_when_keys_repeat():
    """The correction must matter: with 4 rounds keys repeat across windows."""
    g = torch.Generator().manual_seed(0)
    qk = torch.randn(1, 64, 2, 8, dtype=torch.float64, generator=g)
    v = torch.randn(1, 64, 2, 8, dtype=torch.float64, generator=g)
    rot = make_rotations(1, 2, 8, 4, [4])
    kw = dict(chunk_len=8, n_chunks_before=1, n_chunks_after=0, causal=True, backend="reference")
    a = lsh_attention(qk, v, rot, [4], allow_duplicate_attention=True, **kw)
    bb = lsh_attention(qk, v, rot, [4], allow_duplicate_attention=False, **kw)
    assert (a - bb).abs().max() > 1e-3


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("rounds", [1, 3])
def test_single_chunk_equals_full_attention_with_self_mask(causal, rounds):
    g = torch.Generator().manual_seed(3)
    b, h, l, d = 2, 2, 24, 8
    qk = torch.randn(b, l, h, d, dtype=torch.float64, generator=g)
    v = torch.randn(b, l, h, d, dtype=torch.float64, generator=g)
    out = lsh_attention(
        qk,
        v,
        make_rotations(0, h, d, rounds, [4]),
        [4],
        chunk_len=32,
        n_chunks_before=1,
        n_chunks_after=0,
        causal=causal,
    ).transpose(1, 2)
    qk, v = qk.transpose(1, 2), v.transpose(1, 2)
    dots = qk @ normalize_keys(qk).transpose(-1, -2)
    if causal:
        dots = dots.masked_fill(torch.ones(l, l, dtype=torch.bool).triu(1), -1e9)
    dots = dots.masked_fill(torch.eye(l, dtype=torch.bool), -1e5)
    ref = torch.softmax(dots, -1) @ v
    assert (out - ref).abs().max().item() < 1e-10


def test_factorised_hash_is_digit_composition():
    """h = h1 + nb1*h2 with each factor an argmax over [xR; -xR] of its own rotation columns."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 40, 3, 8, generator=g)
    rot = make_rotations(11, 3, 8, 2, [4, 8])
    got = hash_buckets(x, rot, [4, 8])
    assert got.dtype == torch.int32 and got.shape == (2, 3, 2, 40)
    rx = torch.einsum("blhd,hdrf->bhrlf", x, rot)
    h1 = torch.cat([rx[..., :2], -rx[..., :2]], -1).argmax(-1)
    h2 = torch.cat([rx[..., 2:6], -rx[..., 2:6]], -1).argmax(-1)
    assert torch.equal(got, h1 + 4 * h2)
    assert got.max() < 32 and got.min() >= 0
    # with 32 buckets over 80 hash decisions, many buckets are used (the hash is not degenerate)
    assert got.unique().numel() > 10


def test_rotations_are_seeded_and_head_sliceable():
    a = make_rotations(3, 4, 8, 2, [4, 4])
    b = make_rotations(3, 4, 8, 2, [4, 4])
    c = make_rotations(4, 4, 8, 2, [4, 4])
    assert torch.equal(a, b) and not torch.equal(a, c)
    state = torch.get_rng_state()
    make_rotations(9, 4, 8, 2, [4])
    assert torch.equal(state, torch.get_rng_state()), "rotations must not touch the global RNG"


def test_sort_is_stable_by_position():
    buckets = torch.tensor([[[[2, 1, 2, 0, 1, 2], [0, 0, 1, 1, 0, 0]]]], dtype=torch.int32)
    perm = sort_buckets(buckets)
    assert perm.dtype == torch.int32
    assert perm.tolist() == [[[3, 1, 4, 0, 2, 5, 0, 1, 4, 5, 2, 3]]]


@pytest.mark.parametrize("backend", ["reference", "blockwise"])
def test_gradients_match_dense_reference(backend):
    """Backward through the attention core equals backward through the dense reference."""
    g = torch.Generator().manual_seed(8)
    qk = torch.randn(1, 32, 2, 8, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(1, 32, 2, 8, dtype=torch.float64, generator=g, requires_grad=True)
    rot = make_rotations(2, 2, 8, 2, [4])
    out, buckets = lsh_attention(
        qk,
        v,
        rot,
        [4],
        chunk_len=8,
        n_chunks_before=1,
        n_chunks_after=0,
        causal=True,
        return_buckets=True,
        backend=backend,
    )
    w = torch.randn_like(out)
    ga = torch.autograd.grad((out * w).sum(), (qk, v))
    ref = dense_lsh_reference(qk, v, buckets, chunk_len=8, n_chunks_before=1, n_chunks_after=0, causal=True)
    gb = torch.autograd.grad((ref * w).sum(), (qk, v))
    for x, y in zip(ga, gb):
        assert (x - y).abs().max().item() < 1e-9


def test_signed_argmax_matches_the_concatenation_including_ties():
    """Each factor's argmax over [xR; -xR] equals torch.argmax of the concatenation, ties included."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 50, 2, 8, generator=g)
    x[0, :5] = 0.0  # every rotated value 0: max == -min, argmax picks the first column
    x[0, 5:10] = x[0, 5:10].round()  # small integers: more exact ties between columns
    rot = make_rotations(2, 2, 8, 3, [6, 4]).round()
    got = hash_buckets(x, rot, [6, 4])
    rx = torch.einsum("blhd,hdrf->bhrlf", x, rot)
    h1 = torch.cat([rx[..., :3], -rx[..., :3]], -1).argmax(-1)
    h2 = torch.cat([rx[..., 3:5], -rx[..., 3:5]], -1).argmax(-1)
    assert torch.equal(got, (h1 + 6 * h2).to(torch.int32))
    assert (got[..., :5] == 0).all()


@pytest.mark.parametrize("blocks", [1, 7])
def test_hashing_in_blocks_equals_hashing_at_once(blocks, monkeypatch):
    import reformer_dist.model.hashing as hashing

    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 64, 3, 8, generator=g)
    rot = make_rotations(5, 3, 8, 2, [8, 4])
    valid = torch.rand(2, 64, generator=g) > 0.1
    whole = hash_buckets(x, rot, [8, 4], valid)
    monkeypatch.setattr(hashing, "_HASH_BLOCK_ELEMS", blocks * 2 * 3 * 2 * 6)  # `blocks` positions per block
    assert torch.equal(hash_buckets(x, rot, [8, 4], valid), whole)
    assert (whole[0, :, :, ~valid[0]] == 32).all()


def test_hashing_is_fp32_under_bf16_autocast():
    # autocast must not turn the rotation einsum into a bf16 matmul: buckets are the fp32 path's
    from reformer_dist.model.hashing import hash_buckets, make_rotations

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 512, 4, 64, generator=g).to(torch.bfloat16)
    rot = make_rotations(3, 4, 64, 2, [32, 16])
    plain = hash_buckets(x, rot, [32, 16])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = hash_buckets(x, rot, [32, 16])
    assert torch.equal(under, plain)
