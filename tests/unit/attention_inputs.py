"""Random inputs of the attention-core contract (``kernels.chunked_attention``), shared by the core tests."""

from __future__ import annotations

import torch


def make_inputs(
    b: int,
    length: int,
    h: int,
    d: int,
    r: int,
    shared: bool,
    extras: tuple[str, ...],
    seed: int,
    dtype: torch.dtype = torch.float64,
    m: int = 8,
):
    """(q, k or None for shared QK, v, index or None, keyword masks): fresh random values per seed.

    extras: "identity" (no permutation), "valid" (padding), "bucket", "doc", "dup_correction", "piece" (positions and
    chunk_of of a rank's piece of a longer sorted order).
    """
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, length, h, d, generator=g).to(dtype) for _ in range(3))
    index = None
    if "identity" not in extras:
        index = torch.stack([torch.randperm(length, generator=g) for _ in range(b * h * r)]).view(b, h, r * length)
        index = index.to(torch.int32)
    kw = {}
    if "valid" in extras:
        kw["key_valid"] = torch.rand(b, length, generator=g) > 0.25
    if "bucket" in extras:
        kw["slot_bucket"] = torch.randint(0, 3, (b, h, r * length), generator=g, dtype=torch.int32)
    if "doc" in extras:  # packed documents: sorted random boundaries
        kw["document_ids"] = torch.randint(0, 2, (b, length), generator=g).cumsum(-1).to(torch.int32) // 3
    if "dup_correction" in extras:
        kw["allow_duplicate_attention"] = False
    if "piece" in extras:  # a rank's piece of a global order: own positions, chunks of a longer sequence
        s = r * length
        kw["positions"] = torch.stack([torch.randperm(4 * s, generator=g)[:s] for _ in range(b * h)]).view(b, h, s)
        n_chunks = 4 * s // m
        here = (torch.arange(length) // m + n_chunks // 2).expand(b, h, 1, length)  # this piece's own chunks
        other = torch.randint(0, n_chunks, (b, h, 1, length), generator=g)  # the token's chunk in another round
        kw["chunk_of"], kw["n_chunks"] = torch.cat([here, other], 2).to(torch.int32), n_chunks
    return q, None if shared else k, v, index, kw
