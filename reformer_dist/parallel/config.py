"""[parallel]: how the ranks split into data-parallel replicas and sequence-parallel groups, and the SP
batch rule (how DeepSpeed counts sequence-parallel ranks).

world = dp_size x sequence_parallel_size; of the P ranks sharing one sequence, ulysses_size U shard
heads (DeepSpeed-Ulysses) and P/U shard LSH's sorted order (bucket sharding). The rules that involve
the model and the sequence length (heads, chunks) are `parallel.sequence.check_layout`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from reformer_dist.config_schema import FieldError, Section, int_min, opt, optional


@dataclass
class ParallelConfig(Section):
    sequence_parallel_size: int = opt(1, int_min(1), "ranks sharing one sequence; divides the world size")
    ulysses_size: int | None = opt(
        None,
        optional(int_min(1)),
        "of those, ranks that shard heads (DeepSpeed-Ulysses; "
        "divides model.n_heads); the rest shard LSH's sorted order (bucket sharding). "
        "Default: all of them (pure Ulysses), or where model.n_heads is not a multiple "
        "of sequence_parallel_size, the largest size dividing both",
    )
    # why ulysses_size was chosen for the user (`choose_ulysses_size`), for the start announcement; not a key
    auto_note: ClassVar[str | None] = None  # set on the instance; a ClassVar is no config key

    def choose_ulysses_size(self, n_heads: int) -> None:
        """The default layout for a model with `n_heads` heads: all P ranks shard heads when n_heads allows;
        otherwise the largest Ulysses size dividing both P and n_heads, the rest sharding LSH's sorted order.
        An explicit ulysses_size is kept (and checked by `parallel.sequence.check_layout`)."""
        p = self.sequence_parallel_size
        if self.ulysses_size is not None or p == 1 or n_heads % p == 0:
            return
        self.ulysses_size = math.gcd(p, n_heads)
        self.auto_note = (  # type: ignore[misc]  # an instance note; ClassVar keeps it out of the config keys
            f"parallel.ulysses_size = {self.ulysses_size} (chosen: model.n_heads = {n_heads} is not a "
            f"multiple of parallel.sequence_parallel_size = {p}; the largest size dividing both shards "
            f"heads, the other {p // self.ulysses_size} shard LSH's sorted order by bucket)"
        )

    def rules(self) -> None:
        if self.ulysses_size is not None and self.sequence_parallel_size % self.ulysses_size:
            self.fail(
                "ulysses_size",
                f"{self.ulysses_size} must divide parallel.sequence_parallel_size = {self.sequence_parallel_size}",
            )

    @property
    def heads_group_size(self) -> int:
        """U: the ranks that shard heads (ulysses_size, default all P)."""
        return self.sequence_parallel_size if self.ulysses_size is None else self.ulysses_size

    @property
    def bucket_sharding(self) -> bool:
        """Whether some sequence-parallel ranks shard LSH's sorted order (U < P)."""
        return self.heads_group_size < self.sequence_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        """world_size / sequence_parallel_size; FieldError when it does not divide."""
        if world_size % self.sequence_parallel_size:
            raise FieldError(
                type(self).__name__,
                "sequence_parallel_size",
                f"{self.sequence_parallel_size} does not divide the world size {world_size}",
            )
        return world_size // self.sequence_parallel_size


def deepspeed_sequences(sequences: int, sp_size: int) -> int:
    """The SP batch rule: how many sequences DeepSpeed counts for `sequences` real ones.

    DeepSpeed (no mpu) treats every rank as data-parallel, so the `sp_size` ranks that share one
    sequence count as `sp_size` sequences. Three things follow from it: the batch size in the
    DeepSpeed config, the loss scaling that undoes DeepSpeed's gradient average over those ranks
    (`parallel.sequence.sequence_parallel_loss`), and the divisor of the logged mean loss (the trainer).
    """
    return sequences * sp_size


def rank_layout(rank: int, sp_size: int) -> tuple[int, int]:
    """(data-parallel rank, rank within its sequence) of global rank `rank`: consecutive groups of `sp_size`
    ranks share one sequence (parallel/sequence.py builds its process groups the same way)."""
    return rank // sp_size, rank % sp_size
