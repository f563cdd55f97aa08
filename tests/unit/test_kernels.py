"""Every attention-core backend equals the reference: outputs, log-sum-exp and gradients (float64).

Inputs follow the contract of ``kernels.chunked_attention``: unsorted [B, L, H, D] tensors and a sort
permutation per round; fresh random values per case.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from reformer_dist.kernels import blockwise
from reformer_dist.kernels.chunked_attention import available_backends, chunked_attention
from reformer_dist.kernels.reference import chunked_attention_reference
from tests.unit.attention_inputs import make_inputs

# B, L, H, D, M, R, n_chunks_before, n_chunks_after, causal, shared_qk, extras
CASES = [
    (1, 16, 2, 8, 4, 1, 1, 0, True, True, ()),
    (2, 24, 1, 8, 4, 2, 1, 1, False, True, ("valid",)),
    (1, 24, 2, 8, 4, 3, 2, 0, True, True, ("bucket", "dup_correction")),
    (1, 32, 1, 4, 8, 1, 0, 0, True, False, ("valid", "identity")),
    (2, 8, 2, 4, 8, 1, 0, 0, False, True, ("identity",)),
    (1, 16, 2, 8, 4, 4, 1, 0, True, True, ("valid", "dup_correction")),
    (2, 20, 2, 8, 4, 2, 1, 2, False, False, ("valid", "bucket")),
    (2, 24, 2, 8, 4, 2, 1, 0, True, True, ("valid", "doc")),
    (1, 16, 1, 8, 4, 1, 1, 1, False, False, ("identity", "doc")),
    (2, 24, 2, 8, 4, 1, 1, 0, True, True, ("identity", "piece", "dup_correction", "valid")),
]


def grads_of(out, lse, inputs, wo, wl):
    return torch.autograd.grad((out * wo).sum() + (lse * wl).sum(), inputs)


@pytest.mark.parametrize("backend", ["blockwise"])
@pytest.mark.parametrize("b,length,h,d,m,r,nb,na,causal,shared,extras", CASES)
@pytest.mark.parametrize("small_blocks", [False, True])
def test_backend_matches_reference(
    backend, b, length, h, d, m, r, nb, na, causal, shared, extras, small_blocks, monkeypatch
):
    if small_blocks:  # force several blocks per round so block boundaries and window scatter are exercised
        monkeypatch.setattr(blockwise, "_BLOCK_ELEMS", 1)
    seed = zlib.crc32(repr(extras).encode()) % 1000 + length
    q, k, v, index, kw = make_inputs(b, length, h, d, r, shared, extras, seed=seed, m=m)
    inputs = [t.requires_grad_() for t in (q, k, v) if t is not None]
    args = dict(chunk_len=m, n_chunks_before=nb, n_chunks_after=na, causal=causal, self_mask=True, **kw)
    o1, l1 = chunked_attention(q, k, v, index, backend=backend, **args)
    o2, l2 = chunked_attention_reference(q, k, v, index, **args)
    assert o1.shape == (b, length, h, d) and l1.shape == (b, length, h)
    # merging rounds whose log-sum-exp sits near the -1e5 self value costs ~1e-11 in float64
    assert (o1 - o2).abs().max() < 1e-10 and (l1 - l2).abs().max() < 1e-10
    wo, wl = torch.randn_like(o1), torch.randn_like(l1)
    for a, c in zip(grads_of(o1, l1, inputs, wo, wl), grads_of(o2, l2, inputs, wo, wl)):
        assert (a - c).abs().max() < 1e-10
        assert c.abs().max() > 1e-3  # the gradient is not trivially zero


def test_reference_merge_equals_one_softmax_over_the_union_of_rounds():
    """Two rounds with the identity permutation: every key appears twice, so the merged softmax equals
    plain windowed attention (duplicates cancel in the normalisation) -- and with the duplicate correction too."""
    q, k, v, _, _ = make_inputs(1, 16, 1, 4, 1, False, (), seed=3)
    one = torch.arange(16, dtype=torch.int32).view(1, 1, 16)
    two = one.repeat(1, 1, 2)
    kw = dict(chunk_len=16, n_chunks_before=0, n_chunks_after=0, causal=True, self_mask=True)
    o1, l1 = chunked_attention_reference(q, k, v, one, **kw)
    o2, l2 = chunked_attention_reference(q, k, v, two, **kw)
    assert torch.allclose(o1, o2, atol=1e-12) and torch.allclose(l2, l1 + torch.log(torch.tensor(2.0)), atol=1e-12)
    o3, l3 = chunked_attention_reference(q, k, v, two, allow_duplicate_attention=False, **kw)
    assert torch.allclose(o1, o3, atol=1e-12) and torch.allclose(l3, l1, atol=1e-12)


def test_auto_picks_blockwise_on_cpu_and_reference_only_when_asked(monkeypatch):
    calls = []
    real = blockwise._BlockwiseCore.forward
    monkeypatch.setattr(blockwise._BlockwiseCore, "forward", lambda *a: calls.append(1) or real(*a))
    q, k, v, index, _ = make_inputs(1, 16, 1, 4, 1, True, (), seed=0)
    kw = dict(chunk_len=4, n_chunks_before=1, n_chunks_after=0, causal=True, self_mask=True)
    chunked_attention(q, k, v, index, **kw)
    assert calls == [1]  # even when every logit fits one block
    chunked_attention(q, k, v, index, backend="reference", **kw)
    assert calls == [1]


def test_unknown_backend_is_named():
    q, k, v, index, _ = make_inputs(1, 8, 1, 4, 1, True, (), seed=0)
    with pytest.raises(ValueError, match="nope"):
        chunked_attention(q, k, v, index, backend="nope", chunk_len=4, n_chunks_before=1, n_chunks_after=0, causal=True)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(index=torch.zeros(1, 1, 12, dtype=torch.int32)), "index must be"),
        (dict(chunk_len=3), "not a multiple of chunk_len"),
        (dict(key_valid=torch.ones(1, 7, dtype=torch.bool)), "key_valid must be"),
        (dict(slot_bucket=torch.zeros(1, 1, 7, dtype=torch.int32)), "slot_bucket must be"),
    ],
)
def test_contract_violations_are_named(bad, match):
    q, _, v, index, _ = make_inputs(1, 8, 1, 4, 1, True, (), seed=0)
    kw = dict(index=index, chunk_len=4, n_chunks_before=1, n_chunks_after=0, causal=True)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        chunked_attention(q, None, v, kw.pop("index"), **kw)


def test_available_backends_lists_portable_cores():
    assert {"reference", "blockwise"} <= set(available_backends())


def test_backend_names_are_one_list():
    # kernels.backends names every core once: the config's choices, the portable cores and the fused modules
    from reformer_dist.kernels import backends

    assert set(backends.BACKENDS) == {"auto", *backends.PORTABLE, *backends.FUSED}
    assert set(available_backends()) <= set(backends.BACKENDS)
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        q = torch.zeros(1, 8, 1, 4)
        chunked_attention(
            q, None, q, None, chunk_len=8, n_chunks_before=0, n_chunks_after=0, causal=True, backend="nope"
        )
