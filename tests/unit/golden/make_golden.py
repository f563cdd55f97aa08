"""Regenerate golden.json: float64 losses, logits and gradient projections of small models.

Written once with the model as it stood before the memory-lean attention rewrite (commit 3b5df09, with its
residual streams switched to float64 for these float64 models, as the model now does), so
``test_golden.py`` proves that later implementations compute the same function. Rerun only on purpose:
    python tests/unit/golden/make_golden.py
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

from reformer_dist import ReformerConfig, ReformerLM

CASES = {
    "lsh_local_causal": dict(attn_layers=["lsh", "local", "lsh"], n_hashes=2),
    "lsh_4rounds_dedup": dict(attn_layers=["lsh", "lsh", "local"], n_hashes=4, allow_duplicate_attention=False),
    "lsh_same_bucket_noncausal": dict(attn_layers=["lsh", "local", "lsh"], n_hashes=3, same_bucket_only=True,
                                      causal=False, n_chunks_after=1, local_n_chunks_after=1),
    "lsh_factorised_before2": dict(attn_layers=["lsh", "full", "lsh"], n_hashes=2, n_buckets=[4, 2],
                                   n_chunks_before=2),
    "ordinary_stack": dict(attn_layers=["lsh", "local", "lsh"], n_hashes=2, reversible=False),
}
LENGTH = 61  # not a multiple of the chunk: internal padding and masked keys


def build(case: str) -> tuple[ReformerLM, torch.Tensor]:
    kw = dict(vocab_size=20, d_model=16, n_heads=2, d_head=8, d_ff=32, n_layers=3, chunk_len=8,
              axial_pos_shape=[8, 16], ff_chunk_len=24, loss_chunk_len=40)
    kw.update(CASES[case])
    model = ReformerLM(ReformerConfig(**kw)).double()
    with torch.no_grad():  # parameters from their names, independent of construction order
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    ids = torch.randint(0, 20, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    return model, ids


def measure(model: ReformerLM, ids: torch.Tensor) -> dict:
    model.zero_grad(set_to_none=True)
    loss = model.loss(ids, hash_seed=11)
    loss.backward()
    logits = model(ids, hash_seed=11).detach()
    proj = {}
    for name, p in model.named_parameters():
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 1)
        proj[name] = float((p.grad * torch.randn(p.shape, generator=g, dtype=torch.float64)).sum())
    lg = torch.Generator().manual_seed(2)
    return {"loss": float(loss.detach()), "logit_proj": float((logits * torch.randn(logits.shape, generator=lg,
                                                                           dtype=torch.float64)).sum()),
            "logit_first": logits[0, :3, :5].tolist(), "grad_proj": proj}


if __name__ == "__main__":
    out = {case: measure(*build(case)) for case in CASES}
    Path(__file__).with_name("golden.json").write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", len(out), "cases")
