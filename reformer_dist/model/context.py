"""Per-call state that attention layers need, passed explicitly (never cached on modules)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor


@dataclass
class AttentionContext:
    """What one forward pass tells every attention layer.

    hash_seed: base seed of this step's LSH rotations (each layer derives its own from it).
    n_hashes: LSH hash rounds of this call, or None for the model's ``n_hashes`` (more rounds at evaluation:
        ``hashing.make_rotations`` keeps the trained rounds and adds new ones).
    key_valid: [B, L] bool over the sequence attention sees (False = padding), or None.
    doc_ids: [B, L] int over the sequence attention sees: a token attends only to its own document; or None.
    head_offset: index of the first head this process computes (sequence parallelism splits heads).
    backend: attention core implementation ("auto", "reference", or a registered fused kernel).
    sequence_parallel: optional object with ``attend(fn, *tensors, ctx)`` that re-shards [B, L, H, D]
        tensors around the core (``parallel.sequence.SequenceParallel``); None on a single process.
    bucket: optional ``parallel.bucket.BucketSharding`` when the tokens attention sees are one rank's slice
        of the sequence: LSH layers then shard the globally sorted order, local layers exchange halos.
    cache: optional ``model.generation.GenerationCache`` (cached generation): every attention core call goes
        through it, which records the prompt's projections and attends a new token through its cache.
    """

    hash_seed: int = 0
    n_hashes: int | None = None
    key_valid: Tensor | None = None
    doc_ids: Tensor | None = None
    head_offset: int = 0
    backend: str = "auto"
    sequence_parallel: Any | None = None
    bucket: Any | None = None
    cache: Any | None = None

    def attend(self, fn: Callable[..., Tensor], *tensors: Tensor) -> Tensor:
        """Run an attention core ``fn(*tensors, ctx)`` on [B, L, H, D] tensors, re-sharded if needed.
        ``fn`` is the bound ``attend`` method of an attention layer (the cache finds its layer through it)."""
        if self.cache is not None:
            return self.cache.attend(fn, *tensors, ctx=self)
        if self.sequence_parallel is None:
            return fn(*tensors, self)
        return self.sequence_parallel.attend(fn, *tensors, ctx=self)
