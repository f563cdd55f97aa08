"""Angular LSH: seeded random rotations, factorised buckets, and the per-round sort.

Shapes: B batch, H heads, L length, D head size, R hash rounds, F rotation columns (sum of factor/2).
Hashing memory is O(L * F) = O(L * sqrt(n_buckets)) with two factors, never O(L * n_buckets).
Rotations come from a generator seeded by the caller, never from the global RNG, so the backward
recompute and every sequence-parallel rank see the same buckets.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, layer) pairs over the seed space


def layer_seed(hash_seed: int, layer_idx: int) -> int:
    """Seed for one layer's rotations, derived from the step's hash seed."""
    return (int(hash_seed) * _MIX + (layer_idx + 1) * 0x632BE59BD9B4E019) % (2**63 - 1)


def make_rotations(seed: int, n_heads: int, d_head: int, n_hashes: int, factors: list[int],
                   device: torch.device | str = "cpu") -> Tensor:
    """Random rotations [H, D, R, F] drawn from a private generator seeded with ``seed``.

    All heads are drawn together (then sliced by the caller) so a rank holding a subset of heads gets
    exactly the rotations the single-process run would use for those heads.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    cols = sum(f // 2 for f in factors)
    return torch.randn((n_heads, d_head, n_hashes, cols), generator=gen, device=device, dtype=torch.float32)


def hash_buckets(x: Tensor, rotations: Tensor, factors: list[int], key_valid: Tensor | None = None) -> Tensor:
    """Bucket ids [B, H, R, L] of vectors x [B, H, L, D] (computed in fp32, no gradient).

    Factor k contributes ``argmax([xR_k; -xR_k])`` times the product of the factors before it
    (h = h1 + nb1*h2). Padding positions (key_valid False) go to an extra last bucket, so they sort
    after every real token of their round (HF does the same).
    """
    with torch.no_grad():
        rotated = torch.einsum("bhld,hdrf->bhrlf", x.float(), rotations.float())
        buckets = None
        offset, scale = 0, 1
        for f in factors:
            part = rotated[..., offset : offset + f // 2]
            idx = torch.argmax(torch.cat([part, -part], dim=-1), dim=-1)
            buckets = idx if buckets is None else buckets + scale * idx
            offset += f // 2
            scale *= f
        if key_valid is not None:
            buckets = torch.where(key_valid[:, None, None, :], buckets, torch.full_like(buckets, scale))
    return buckets


def sort_buckets(buckets: Tensor) -> tuple[Tensor, Tensor]:
    """Stable sort of each round by (bucket, position): returns perm and its inverse, both [B, H, R, L].

    ``perm[..., s]`` is the original position in sorted slot s; ``undo[..., p]`` the slot of position p.
    """
    _, perm = torch.sort(buckets, dim=-1, stable=True)
    undo = torch.empty_like(perm)
    ar = torch.arange(perm.shape[-1], device=perm.device).expand_as(perm)
    undo.scatter_(-1, perm, ar)
    return perm, undo
