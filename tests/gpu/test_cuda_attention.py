"""CUDA checks of every attention backend (the compiled Triton kernel included) against the float64 CPU
reference, at realistic sizes, in bf16 and fp32; "auto" picks the fused kernel; the model trains in bf16.

Run on a GPU machine: `pytest -q tests/gpu` (benchmarks/gpu_suite.sh does). Tolerances: relative error (norm-wise)
< 1e-4 in fp32 and < 1e-2 in bf16, as the interpreter tests in tests/unit/test_triton_kernel.py. fp32 is the
kernels' accuracy contract for tf32x3 (three TF32 tensor-core products; docs/model.md): < 1e-4 vs float64.
Chunks of 128 and 256 run in sub-tiles (``triton_lsh.tiles_for``); head size 128 is the largest accepted.
"""

from __future__ import annotations

import pytest
import torch

from reformer_dist import ReformerConfig, ReformerLM
from reformer_dist.kernels import chunked_attention as dispatch
from reformer_dist.kernels.chunked_attention import available_backends, chunked_attention
from reformer_dist.kernels.reference import chunked_attention_reference

pytestmark = pytest.mark.gpu

# L, H, M, R, n_chunks_before, n_chunks_after, causal, shared_qk, extras
# (D = 64 unless "d128"; L not a multiple of M: padded keys)
CASES = [
    (1000, 4, 64, 1, 1, 0, True, True, ("valid",)),
    (1000, 4, 64, 2, 1, 0, True, True, ("valid",)),
    (2048, 2, 64, 4, 1, 0, True, True, ("dup_correction",)),
    (1024, 4, 64, 2, 1, 1, False, True, ("valid", "bucket")),
    (1536, 2, 32, 3, 2, 0, True, True, ()),
    (1024, 4, 128, 1, 1, 0, True, False, ("identity",)),  # local attention: separate keys, no permutation
    (4000, 4, 256, 2, 1, 0, True, True, ("valid",)),  # configs/million_1gpu.toml's chunk: 4 x 4 sub-tiles
    (2048, 2, 256, 1, 1, 1, False, False, ("identity", "d128")),  # the largest tiles accepted
    (2048, 2, 128, 4, 1, 0, True, True, ("d128", "dup_correction")),  # enwik8_64k's LSH layers
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def inputs(length, h, m, r, shared, extras, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    lp = (length + m - 1) // m * m
    d = 128 if "d128" in extras else 64
    q, k, v = (torch.randn(1, lp, h, d, generator=g).to(dtype) for _ in range(3))
    index = None
    if "identity" not in extras:
        index = torch.stack([torch.randperm(lp, generator=g) for _ in range(h * r)]).view(1, h, r * lp).to(torch.int32)
    kw = {}
    if "valid" in extras or lp != length:
        kw["key_valid"] = (torch.arange(lp) < length).expand(1, lp).clone()
    if "bucket" in extras:
        kw["slot_bucket"] = torch.randint(0, 4, (1, h, r * lp), generator=g, dtype=torch.int32)
    if "dup_correction" in extras:
        kw["allow_duplicate_attention"] = False
    return q, None if shared else k, v, index, kw


@pytest.mark.parametrize("backend", [b for b in available_backends() if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length,h,m,r,nb,na,causal,shared,extras", CASES)
def test_backend_on_cuda_matches_cpu_float64_reference(backend, dtype, length, h, m, r, nb, na, causal, shared, extras):
    q, k, v, index, kw = inputs(length, h, m, r, shared, extras, dtype, seed=length + r)
    args = dict(chunk_len=m, n_chunks_before=nb, n_chunks_after=na, causal=causal, self_mask=True)
    ref = [t.double().requires_grad_() for t in (q, k, v) if t is not None]
    o_ref, l_ref = chunked_attention_reference(ref[0], None if shared else ref[1], ref[-1], index, **args, **kw)
    go, gl = torch.randn_like(o_ref), torch.randn_like(l_ref)
    g_ref = torch.autograd.grad((o_ref * go).sum() + (l_ref * gl).sum(), ref)
    dev = [t.cuda().requires_grad_() for t in (q, k, v) if t is not None]
    kw_dev = {n: t.cuda() if isinstance(t, torch.Tensor) else t for n, t in kw.items()}
    o, lse = chunked_attention(
        dev[0],
        None if shared else dev[1],
        dev[-1],
        None if index is None else index.cuda(),
        backend=backend,
        **args,
        **kw_dev,
    )
    grads = torch.autograd.grad((o.double() * go.cuda()).sum() + (lse.double() * gl.cuda()).sum(), dev)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    assert rel(o.cpu(), o_ref) < tol and rel(lse.cpu(), l_ref) < tol
    for a, c in zip(grads, g_ref):
        assert rel(a.cpu(), c) < tol


def test_auto_picks_the_fused_kernel_on_cuda(monkeypatch):
    assert "triton" in available_backends()
    calls = []
    fn, supports = dispatch._BACKENDS["triton"]
    monkeypatch.setitem(dispatch._BACKENDS, "triton", (lambda *a, **k: calls.append(1) or fn(*a, **k), supports))
    q, k, v, index, kw = inputs(512, 2, 64, 2, True, (), torch.bfloat16, seed=0)
    chunked_attention(
        q.cuda(), None, v.cuda(), index.cuda(), chunk_len=64, n_chunks_before=1, n_chunks_after=0, causal=True
    )
    assert calls == [1]


def test_model_triton_equals_blockwise_on_cuda():
    torch.manual_seed(0)
    base = dict(
        vocab_size=257,
        d_model=128,
        n_heads=4,
        d_head=32,
        d_ff=256,
        n_layers=2,
        attn_layers=["lsh", "local"],
        chunk_len=64,
        axial_pos_shape=[64, 128],
    )
    ids = torch.randint(0, 257, (1, 4000), device="cuda")
    out = {}
    for backend in ("blockwise", "triton"):
        torch.manual_seed(0)
        model = ReformerLM(ReformerConfig(**base, attention_backend=backend)).cuda()
        loss = model.loss(ids, hash_seed=1)
        loss.backward()
        out[backend] = (loss.item(), {n: p.grad for n, p in model.named_parameters()})
    assert abs(out["blockwise"][0] - out["triton"][0]) < 1e-4 * abs(out["blockwise"][0])
    for n, g in out["blockwise"][1].items():
        assert rel(out["triton"][1][n], g) < 1e-3, n


def test_model_trains_on_cuda_in_bf16():
    torch.manual_seed(0)
    cfg = ReformerConfig(
        vocab_size=257,
        d_model=128,
        n_heads=4,
        d_head=32,
        d_ff=256,
        n_layers=2,
        attn_layers=["lsh", "local"],
        chunk_len=64,
        axial_pos_shape=[128, 128],
    )
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


def test_calls_the_kernels_do_not_take_fall_back_to_blockwise_with_one_warning(monkeypatch):
    from reformer_dist.kernels.blockwise import chunked_attention_blockwise

    monkeypatch.setattr(dispatch, "_WARNED", set())
    q, k, v, index, kw = inputs(1024, 2, 512, 1, True, (), torch.bfloat16, seed=3)
    args = dict(chunk_len=512, n_chunks_before=1, n_chunks_after=0, causal=True)
    with pytest.warns(UserWarning, match="chunk length 512"):
        o, lse = chunked_attention(q.cuda(), None, v.cuda(), index.cuda(), **args)
    o2, _ = chunked_attention_blockwise(q.cuda(), None, v.cuda(), index.cuda(), **args)
    assert torch.equal(o, o2)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason again: no second warning
        chunked_attention(q.cuda(), None, v.cuda(), index.cuda(), **args)


def test_offsets_past_2_pow_31_batch_rows_equal_each_row_alone():
    # batch 5 x 1M tokens x 8 heads x 64: the last rows start past element 2^31 of q, k and v
    torch.manual_seed(0)
    b, length, h, d, m = 5, 1 << 20, 8, 64, 64
    q = torch.randn(b, length, h, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(q)
    index = torch.stack([torch.randperm(length, device="cuda") for _ in range(2)]).view(1, 1, 2 * length)
    index = index.expand(b, h, 2 * length).to(torch.int32).contiguous()
    args = dict(chunk_len=m, n_chunks_before=1, n_chunks_after=0, causal=True)
    assert q.stride(0) * (b - 1) >= 2**31  # the last row's first element
    o, _ = chunked_attention(q, None, v, index, backend="triton", **args)
    last, _ = chunked_attention(
        q[b - 1 :].contiguous(), None, v[b - 1 :].contiguous(), index[b - 1 :].contiguous(), backend="triton", **args
    )
    assert torch.equal(o[b - 1 :], last)
