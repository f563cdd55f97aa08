"""Angular LSH: seeded random rotations, factorised buckets, and the per-round sort.

Shapes: B batch, L length, H heads, D head size, R hash rounds, F rotation columns (sum of factor/2).
Memory is O(L) with a bounded transient: positions are hashed in blocks of at most ``_HASH_BLOCK_ELEMS``
rotated values, each factor's argmax over [xR; -xR] is taken from xR's max and min (the concatenation
is never built), and what is kept is compact: bucket ids and the sort permutation in int32.
Rotations come from a generator seeded by the caller, never from the global RNG, so the backward
recompute and every sequence-parallel rank see the same buckets.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, layer) pairs over the seed space
_HASH_BLOCK_ELEMS = 1 << 22  # rotated values per block (16 MiB in fp32)


def layer_seed(hash_seed: int, layer_idx: int) -> int:
    """Seed for one layer's rotations, derived from the step's hash seed."""
    return (int(hash_seed) * _MIX + (layer_idx + 1) * 0x632BE59BD9B4E019) % (2**63 - 1)


def make_rotations(
    seed: int,
    n_heads: int,
    d_head: int,
    n_hashes: int,
    factors: list[int],
    device: torch.device | str = "cpu",
    *,
    trained_hashes: int | None = None,
) -> Tensor:
    """Random rotations [H, D, R, F] drawn from a private generator seeded with ``seed``.

    All heads are drawn together (then sliced by the caller) so a rank holding a subset of heads gets
    exactly the rotations the single-process run would use for those heads.

    ``trained_hashes`` (the model's configured round count; default ``n_hashes``) makes the rounds a
    prefix-stable sequence when evaluating with another count: the first ``min(R, trained_hashes)``
    rounds are exactly the training draw, and every further round r is drawn on its own from
    ``extra_round_seed(seed, r)``. So round r is the same for every R > r, R = trained_hashes gives the
    training rotations bit for bit, and raising R only adds rounds. (HF's ``num_hashes`` argument
    instead draws a fresh [H, D, R, F] tensor, which changes every round.)
    """
    device = torch.device(device)
    base = n_hashes if trained_hashes is None else trained_hashes
    cols = sum(f // 2 for f in factors)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    rot = torch.randn((n_heads, d_head, base, cols), generator=gen, device=device, dtype=torch.float32)
    if n_hashes <= base:
        return rot if n_hashes == base else rot[:, :, :n_hashes].contiguous()
    extra = []
    for r in range(base, n_hashes):
        gen.manual_seed(extra_round_seed(seed, r))
        extra.append(torch.randn((n_heads, d_head, cols), generator=gen, device=device, dtype=torch.float32))
    return torch.cat([rot, torch.stack(extra, dim=2)], dim=2)


def extra_round_seed(seed: int, round_idx: int) -> int:
    """Seed of an evaluation-only round ``round_idx`` (>= the trained round count) of a layer seeded ``seed``."""
    return (int(seed) * _MIX + (round_idx + 1) * 0x2545F4914F6CDD1D) % (2**63 - 1)


def _argmax_signed(part: Tensor) -> Tensor:
    """``argmax(cat([part, -part], -1), -1)`` without the concatenation (first maximum wins, as argmax)."""
    hi, arg_hi = part.max(dim=-1)
    lo, arg_lo = part.min(dim=-1)
    return torch.where(hi >= -lo, arg_hi, arg_lo + part.shape[-1])


def hash_buckets(x: Tensor, rotations: Tensor, factors: list[int], key_valid: Tensor | None = None) -> Tensor:
    """Bucket ids [B, H, R, L] (int32) of vectors x [B, L, H, D] (computed in fp32, no gradient).

    Factor k contributes ``argmax([xR_k; -xR_k])`` times the product of the factors before it
    (h = h1 + nb1*h2). Padding positions (key_valid [B, L] False) go to an extra last bucket, so they
    sort after every real token of their round (HF does the same).
    """
    b, length, h, _ = x.shape
    r, cols = rotations.shape[2], rotations.shape[3]
    out = torch.empty(b, h, r, length, dtype=torch.int32, device=x.device)
    step = max(1, _HASH_BLOCK_ELEMS // max(1, b * h * r * cols))
    rot = rotations.float()
    # autocast would run the einsum as a bf16 matmul: the buckets of a bf16 run must be those of fp32
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        for s in range(0, length, step):
            e = min(s + step, length)
            rotated = torch.einsum("blhd,hdrf->bhrlf", x[:, s:e].float(), rot)
            acc = torch.zeros(b, h, r, e - s, dtype=torch.int32, device=x.device)
            offset, scale = 0, 1
            for f in factors:
                acc += scale * _argmax_signed(rotated[..., offset : offset + f // 2]).to(torch.int32)
                offset += f // 2
                scale *= f
            out[..., s:e] = acc
        if key_valid is not None:
            out.masked_fill_(~key_valid[:, None, None, :], scale)
    return out


def sort_buckets(buckets: Tensor) -> Tensor:
    """Stable sort of each round by (bucket, position): the sort permutation [B, H, R*L] (int32).

    ``perm[..., r*L + s]`` is the original position in slot s of round r. Rounds are sorted one at a
    time so the int64 indices torch.sort returns exist for one round only.
    """
    b, h, r, length = buckets.shape
    perm = torch.empty(b, h, r * length, dtype=torch.int32, device=buckets.device)
    for i in range(r):
        _, order = torch.sort(buckets[:, :, i], dim=-1, stable=True)
        perm[..., i * length : (i + 1) * length] = order
    return perm
