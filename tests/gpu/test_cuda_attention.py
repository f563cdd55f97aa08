"""CUDA checks of every attention backend against the float64 CPU reference, in bf16 and fp32.

Run on a GPU machine: `pytest -q tests/gpu`. bf16 tolerance: relative error < 1e-2 (norm-wise).
"""

from __future__ import annotations

import pytest
import torch

from reformer_dist import ReformerConfig, ReformerLM
from reformer_dist.kernels.chunked_attention import available_backends, chunked_attention
from reformer_dist.kernels.reference import chunked_attention_reference

pytestmark = pytest.mark.gpu


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("rounds", [1, 2, 4])
def test_backend_on_cuda_matches_cpu_reference(backend, dtype, causal, rounds):
    g = torch.Generator().manual_seed(rounds)
    b, h, l, m, d = 1, 4, 1000, 64, 64  # odd length: the last chunk is padding, masked via key_valid
    lp = (l + m - 1) // m * m
    q, v = (torch.randn(b, lp, h, d, generator=g, dtype=torch.float64) for _ in range(2))
    index = torch.stack([torch.randperm(lp, generator=g) for _ in range(b * h * rounds)]).view(b, h, rounds * lp)
    index = index.to(torch.int32)
    key_valid = (torch.arange(lp) < l).expand(b, lp)
    kw = dict(chunk_len=m, n_before=1, n_after=0 if causal else 1, causal=causal, self_mask=True,
              key_valid=key_valid)
    ref = [t.clone().requires_grad_() for t in (q, v)]
    o_ref, l_ref = chunked_attention_reference(ref[0], None, ref[1], index, **kw)
    go, gl = torch.randn_like(o_ref), torch.randn_like(l_ref)
    g_ref = torch.autograd.grad((o_ref * go).sum() + (l_ref * gl).sum(), ref)
    dev = [t.detach().to("cuda", dtype).requires_grad_() for t in (q, v)]
    o, lse = chunked_attention(dev[0], None, dev[1], index.cuda(), backend=backend,
                               **{**kw, "key_valid": key_valid.cuda()})
    grads = torch.autograd.grad((o.double() * go.cuda()).sum() + (lse.double() * gl.cuda()).sum(), dev)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    assert rel(o.cpu(), o_ref) < tol and rel(lse.cpu(), l_ref) < tol
    for a, c in zip(grads, g_ref):
        assert rel(a.cpu(), c) < tol


def test_model_trains_on_cuda_in_bf16():
    torch.manual_seed(0)
    cfg = ReformerConfig(vocab_size=257, d_model=128, n_heads=4, d_head=32, d_ff=256, n_layers=2,
                         attn_layers=["lsh", "local"], chunk_len=64, axial_pos_shape=[128, 128])
    model = ReformerLM(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 257, (1, 8192), device="cuda")
    losses = []
    for step in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(ids, hash_seed=step)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
