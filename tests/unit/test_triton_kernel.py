"""The fused Triton core equals the float64 reference: outputs, log-sum-exp and every input gradient.

On CPU the kernels run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), which
proves the algorithm and the indexing; tests/gpu runs the same checks compiled on CUDA. Shapes are tiny:
the interpreter executes every program in Python. Inputs are fresh random values per case; the reference
sees the same (rounded) values in float64.
"""

from __future__ import annotations

import pytest
import torch

from reformer_dist import ReformerConfig, ReformerLM
from reformer_dist.kernels import triton_lsh
from reformer_dist.kernels.chunked_attention import available_backends, chunked_attention
from reformer_dist.kernels.reference import chunked_attention_reference
from tests.unit.attention_inputs import make_inputs

# B, L, H, D, M, R, n_chunks_before, n_chunks_after, causal, shared_qk, extras
CASES = [
    (1, 32, 2, 16, 16, 1, 1, 0, True, True, ()),
    (2, 48, 1, 16, 16, 2, 1, 1, False, True, ("valid",)),
    (1, 24, 1, 8, 12, 3, 2, 0, True, True, ("bucket", "dup_correction")),  # chunk 12 in a 16-lane tile, D 8 in 16
    (1, 16, 1, 16, 8, 4, 1, 0, True, True, ("valid", "dup_correction")),
    (1, 24, 2, 16, 8, 2, 0, 2, False, False, ("valid", "bucket")),
    (2, 16, 2, 16, 16, 1, 0, 0, False, False, ("identity", "valid")),  # local/full attention: no permutation
    (1, 48, 1, 16, 16, 1, 1, 0, True, False, ("identity",)),
    (1, 32, 1, 16, 8, 2, 1, 0, True, True, ("valid", "doc")),
    (1, 32, 2, 16, 8, 1, 1, 0, True, True, ("identity", "piece", "dup_correction")),
]


# bf16 on a subset (the interpreter is slow): permuted and identity, shared and separate keys, masks
BF16_CASES = [CASES[1], CASES[4], CASES[5]]
PARAMS = [(torch.float32, 1e-4, *c) for c in CASES] + [(torch.bfloat16, 1e-2, *c) for c in BF16_CASES]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype,tol,b,length,h,d,m,r,nb,na,causal,shared,extras", PARAMS)
def test_triton_matches_float64_reference(dtype, tol, b, length, h, d, m, r, nb, na, causal, shared, extras):
    check_against_reference(dtype, tol, b, length, h, d, m, r, nb, na, causal, shared, extras)


# Chunks wider than their tiles: the kernels walk query and key sub-tiles (on GPU, chunks of up to 256 in tiles
# of up to 64). Tiles are forced small so the interpreter can afford several per chunk, including a last tile
# that passes the chunk's end (40 = 16 + 16 + 8) and unequal query/key tiles.
# tiles (bq, bk), then the CASES columns
SUBTILE_CASES = [
    ((16, 16), 1, 80, 2, 16, 40, 2, 1, 0, True, True, ("valid", "dup_correction")),
    ((16, 32), 2, 96, 1, 16, 48, 2, 1, 1, False, True, ("bucket",)),
    ((32, 16), 1, 72, 1, 16, 24, 3, 2, 0, True, True, ("doc",)),
    ((16, 16), 1, 80, 2, 16, 40, 1, 1, 0, True, False, ("identity", "valid")),
    ((16, 16), 1, 64, 1, 16, 32, 2, 1, 0, True, True, ("piece", "dup_correction")),
]


# bf16 on one case (the interpreter is slow): the fp32 cases cover the indexing
SUBTILE_PARAMS = [(torch.float32, 1e-4, *c) for c in SUBTILE_CASES] + [(torch.bfloat16, 1e-2, *SUBTILE_CASES[1])]


@pytest.mark.parametrize("dtype,tol,tiles,b,length,h,d,m,r,nb,na,causal,shared,extras", SUBTILE_PARAMS)
def test_subtiled_chunks_match_float64_reference(
    monkeypatch, dtype, tol, tiles, b, length, h, d, m, r, nb, na, causal, shared, extras
):
    real = triton_lsh.tiles_for
    monkeypatch.setattr(triton_lsh, "tiles_for", lambda m_, d_, dt: real(m_, d_, dt)._replace(bq=tiles[0], bk=tiles[1]))
    check_against_reference(dtype, tol, b, length, h, d, m, r, nb, na, causal, shared, extras)


def check_against_reference(dtype, tol, b, length, h, d, m, r, nb, na, causal, shared, extras):
    """Outputs, lse and every input gradient of the Triton core vs the float64 reference on the same values."""
    q, k, v, index, kw = make_inputs(b, length, h, d, r, shared, extras, seed=length * 7 + r, dtype=dtype, m=m)
    args = dict(chunk_len=m, n_chunks_before=nb, n_chunks_after=na, causal=causal, self_mask=True, **kw)
    x64 = [t.double().requires_grad_() for t in (q, k, v) if t is not None]
    xs = [t.detach().clone().requires_grad_() for t in (q, k, v) if t is not None]
    k64, ks = (None, None) if shared else (x64[1], xs[1])
    o_ref, l_ref = chunked_attention_reference(x64[0], k64, x64[-1], index, **args)
    o, lse = chunked_attention(xs[0], ks, xs[-1], index, backend="triton", **args)
    assert o.dtype == dtype and o.shape == o_ref.shape and lse.shape == l_ref.shape
    assert rel(o, o_ref) < tol and rel(lse, l_ref) < tol
    wo, wl = torch.randn_like(o_ref), torch.randn_like(l_ref)
    g_ref = torch.autograd.grad((o_ref * wo).sum() + (l_ref * wl).sum(), x64)
    g = torch.autograd.grad((o.double() * wo).sum() + (lse.double() * wl).sum(), xs)
    for name, a, c in zip("qkv" if not shared else "qv", g, g_ref):
        assert a.dtype == dtype and rel(a, c) < tol, name


def test_triton_is_registered_for_auto():
    assert "triton" in available_backends()


def test_whole_model_loss_and_gradients_triton_vs_blockwise():
    torch.manual_seed(0)
    base = dict(
        vocab_size=24,
        d_model=32,
        n_heads=2,
        d_head=16,
        d_ff=32,
        n_layers=2,
        attn_layers=["lsh", "local"],
        n_hashes=2,
        chunk_len=16,
        axial_pos_shape=[8, 16],
        ff_chunk_len=64,
        loss_chunk_len=64,
    )
    ids = torch.randint(0, 24, (1, 57))  # padded to 64 inside: masked keys
    results = {}
    for backend in ("blockwise", "triton"):
        torch.manual_seed(0)
        model = ReformerLM(ReformerConfig(**base, attention_backend=backend))
        loss = model.loss(ids, hash_seed=2)
        loss.backward()
        results[backend] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (l1, g1), (l2, g2) = results["blockwise"], results["triton"]
    assert abs(l1 - l2) < 1e-5 * abs(l1)
    for n in g1:
        assert rel(g2[n], g1[n]) < 1e-4, n
