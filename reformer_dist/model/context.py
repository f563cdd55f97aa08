"""Per-call state that attention layers need, passed explicitly (never cached on modules), and the seams through
which the model calls what others own: sequence parallelism, bucket sharding (``parallel/``) and the generation
cache. The seams are Protocols naming exactly what the model uses, so model/ imports neither parallel/ nor
DeepSpeed; ``parallel.sequence.SequenceParallel`` / ``UlyssesAttention``, ``parallel.bucket.BucketSharding`` and
``model.generation.GenerationCache`` satisfy them structurally.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from torch import Tensor

from reformer_dist.kernels.backends import Backend

AttentionCall = Callable[..., Tensor]  # a layer's bound ``attend(*tensors, ctx)``: [B, L, H, D] tensors in, one out


class BucketShardingSeam(Protocol):
    """This rank holds a slice of the sequence; LSH layers shard the globally sorted order, local layers exchange
    halo chunks (``parallel.bucket.BucketSharding``). Both take and return this rank's [B, Lk, H, D] tokens."""

    @property
    def size(self) -> int:
        """Ranks sharing the sequence (the whole sequence is ``size`` x the local length)."""

    def lsh(
        self,
        qk: Tensor,
        v: Tensor,
        rotations: Tensor,
        factors: list[int],
        *,
        chunk_len: int,
        n_chunks_before: int,
        n_chunks_after: int,
        causal: bool,
        same_bucket_only: bool = False,
        allow_duplicate_attention: bool = True,
        backend: Backend = "auto",
    ) -> Tensor:
        """Shared-QK LSH attention over the whole sequence's sorted order."""

    def local(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        chunk_len: int,
        n_chunks_before: int,
        n_chunks_after: int,
        causal: bool,
        backend: Backend = "auto",
    ) -> Tensor:
        """Local attention with the neighbours' halo chunks."""


class SequenceParallelSeam(Protocol):
    """How the ranks of one sequence split attention (``parallel.sequence.SequenceParallel``, or a bare
    ``UlyssesAttention``): ``attend`` re-shards [B, L, H, D] tensors around an attention core."""

    @property
    def size(self) -> int:
        """Ranks sharing one sequence (P); each holds L / P consecutive tokens."""

    @property
    def ulysses_size(self) -> int:
        """Of those, the ranks that shard heads (U)."""

    @property
    def bucket(self) -> BucketShardingSeam | None:
        """The bucket sharding of the sorted order (P / U ranks), or None when every rank sees the whole sequence."""

    def attend(self, fn: AttentionCall, *tensors: Tensor, ctx: AttentionContext) -> Tensor:
        """``fn(*tensors, inner_ctx)`` on re-sharded tensors, the result sharded back."""


class AttentionCache(Protocol):
    """Cached generation (``model.generation.GenerationCache``): every attention core call goes through it."""

    def attend(self, fn: AttentionCall, *tensors: Tensor, ctx: AttentionContext) -> Tensor:
        """Record the prompt's projections and run ``fn``, or attend a new token through the layer's cache."""


@dataclass
class AttentionContext:
    """What one forward pass tells every attention layer.

    hash_seed: base seed of this step's LSH rotations (each layer derives its own from it).
    n_hashes: LSH hash rounds of this call, or None for the model's ``n_hashes`` (more rounds at evaluation:
        ``hashing.make_rotations`` keeps the trained rounds and adds new ones).
    key_valid: [B, L] bool over the sequence attention sees (False = padding), or None; the model's
        ``attention_mask`` (HF's name, 1 = real token) becomes this once, in ``ReformerLM.embed``.
    document_ids: [B, L] int over the sequence attention sees: a token attends only to its own document; or None.
    head_offset: index of the first head this process computes (sequence parallelism splits heads).
    backend: attention core implementation (``kernels.backends``).
    sequence_parallel: how the ranks of one sequence split attention; None on a single process.
    bucket: set (by ``sequence_parallel``) when the tokens attention sees are one rank's slice of the sequence:
        LSH layers then shard the globally sorted order, local layers exchange halos.
    cache: set in cached generation: every attention core call goes through it.
    """

    hash_seed: int = 0
    n_hashes: int | None = None
    key_valid: Tensor | None = None
    document_ids: Tensor | None = None
    head_offset: int = 0
    backend: Backend = "auto"
    sequence_parallel: SequenceParallelSeam | None = None
    bucket: BucketShardingSeam | None = None
    cache: AttentionCache | None = None

    def attend(self, fn: AttentionCall, *tensors: Tensor) -> Tensor:
        """Run an attention core ``fn(*tensors, ctx)`` on [B, L, H, D] tensors, re-sharded if needed.
        ``fn`` is the bound ``attend`` method of an attention layer (the cache finds its layer through it)."""
        if self.cache is not None:
            return self.cache.attend(fn, *tensors, ctx=self)
        if self.sequence_parallel is None:
            return fn(*tensors, self)
        return self.sequence_parallel.attend(fn, *tensors, ctx=self)
