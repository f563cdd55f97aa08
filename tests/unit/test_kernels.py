"""Every attention-core backend equals the reference: outputs, log-sum-exp and gradients (float64)."""

from __future__ import annotations

import pytest
import torch

from reformer_dist.kernels import blockwise
from reformer_dist.kernels.chunked_attention import available_backends, chunked_attention
from reformer_dist.kernels.reference import chunked_attention_reference

CASES = [  # B, H, N, M, D, n_before, n_after, causal, self_mask, extras
    (1, 2, 6, 4, 8, 1, 0, True, True, ()),
    (2, 1, 8, 4, 8, 1, 1, False, True, ("valid",)),
    (1, 2, 6, 4, 8, 2, 0, True, True, ("bucket", "dedup")),
    (1, 1, 4, 8, 4, 0, 0, True, False, ("valid",)),
    (2, 2, 1, 8, 4, 0, 0, False, True, ()),
]


def make_inputs(b, h, n, m, d, extras, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, m, d, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    r = 2
    l = n * m // r if "dedup" in extras else n * m
    perm = torch.stack([torch.randperm(l, generator=g) for _ in range(b * h * (r if "dedup" in extras else 1))])
    pos = perm.view(b, h, n, m)
    kw = {}
    if "valid" in extras:
        kw["key_valid"] = torch.rand(b, h, n, m, generator=g) > 0.2
    if "bucket" in extras:
        kw["bucket"] = torch.randint(0, 3, (b, h, n, m), generator=g)
    if "dedup" in extras:
        undo = torch.argsort(perm.view(b, h, r, l), dim=-1)
        kw["chunk_of"] = (undo + torch.arange(r).view(1, 1, r, 1) * l) // m
    return q, k, v, pos, kw


@pytest.mark.parametrize("backend", [b for b in available_backends() if b != "reference"])
@pytest.mark.parametrize("b,h,n,m,d,nb,na,causal,self_mask,extras", CASES)
@pytest.mark.parametrize("small_blocks", [False, True])
def test_backend_matches_reference(backend, b, h, n, m, d, nb, na, causal, self_mask, extras, small_blocks,
                                   monkeypatch):
    if small_blocks:  # force several blocks so block boundaries and window scatter are exercised
        monkeypatch.setattr(blockwise, "_BLOCK_ELEMS", 1)
    q, k, v, pos, kw = make_inputs(b, h, n, m, d, extras)
    args = dict(n_before=nb, n_after=na, causal=causal, self_mask=self_mask, **kw)
    o1, l1 = chunked_attention(q, k, v, pos, backend=backend, **args)
    o2, l2 = chunked_attention_reference(q, k, v, pos, **args)
    assert (o1 - o2).abs().max() < 1e-12 and (l1 - l2).abs().max() < 1e-12
    wo, wl = torch.randn_like(o1), torch.randn_like(l1)
    g1 = torch.autograd.grad((o1 * wo).sum() + (l1 * wl).sum(), (q, k, v))
    g2 = torch.autograd.grad((o2 * wo).sum() + (l2 * wl).sum(), (q, k, v))
    for a, c in zip(g1, g2):
        assert (a - c).abs().max() < 1e-10


def test_auto_picks_blockwise_when_logits_exceed_one_block(monkeypatch):
    calls = []
    real = blockwise._BlockwiseAttention.apply
    monkeypatch.setattr(blockwise._BlockwiseAttention, "apply", lambda *a: calls.append(1) or real(*a))
    q, k, v, pos, _ = make_inputs(1, 1, 4, 4, 4, ())
    kw = dict(n_before=1, n_after=0, causal=True, self_mask=True)
    chunked_attention(q, k, v, pos, **kw)
    assert calls == []  # 128 logits fit in one block: plain autograd
    monkeypatch.setattr(blockwise, "_BLOCK_ELEMS", 64)
    chunked_attention(q, k, v, pos, **kw)
    assert calls == [1]


def test_auto_on_cpu_uses_a_portable_backend():
    q, k, v, pos, _ = make_inputs(1, 1, 2, 4, 4, ())
    o, l = chunked_attention(q, k, v, pos, n_before=1, n_after=0, causal=True, self_mask=True)
    o2, l2 = chunked_attention_reference(q, k, v, pos, n_before=1, n_after=0, causal=True, self_mask=True)
    assert torch.allclose(o, o2) and torch.allclose(l, l2)


def test_unknown_backend_is_named():
    q, k, v, pos, _ = make_inputs(1, 1, 2, 4, 4, ())
    with pytest.raises(ValueError, match="nope"):
        chunked_attention(q, k, v, pos, backend="nope", n_before=1, n_after=0, causal=True, self_mask=True)
