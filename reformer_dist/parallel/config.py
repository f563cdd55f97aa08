"""[parallel]: how the ranks split into data-parallel replicas and sequence-parallel groups, and the SP
batch rule (how DeepSpeed counts sequence-parallel ranks).

world = dp_size x sequence_parallel_size; of the P ranks sharing one sequence, ulysses_size U shard
heads (DeepSpeed-Ulysses) and P/U shard LSH's sorted order (bucket sharding). The rules that involve
the model and the sequence length (heads, chunks) are `parallel.sequence.check_layout`.
"""

from __future__ import annotations

from dataclasses import dataclass

from reformer_dist.config_schema import FieldError, Section, int_min, opt, optional


@dataclass
class ParallelConfig(Section):
    sequence_parallel_size: int = opt(1, int_min(1), "ranks sharing one sequence; divides the world size")
    ulysses_size: int | None = opt(None, optional(int_min(1)), "of those, ranks that shard heads (DeepSpeed-Ulysses; "
                                   "divides model.n_heads); the rest shard LSH's sorted order (bucket sharding). "
                                   "Default: all of them (pure Ulysses)")

    def rules(self) -> None:
        if self.ulysses_size is not None and self.sequence_parallel_size % self.ulysses_size:
            self.fail("ulysses_size", f"{self.ulysses_size} must divide parallel.sequence_parallel_size = "
                                      f"{self.sequence_parallel_size}")

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
            raise FieldError(type(self).__name__, "sequence_parallel_size",
                             f"{self.sequence_parallel_size} does not divide the world size {world_size}")
        return world_size // self.sequence_parallel_size


def deepspeed_sequences(sequences: int, sp_size: int) -> int:
    """The SP batch rule: how many sequences DeepSpeed counts for `sequences` real ones.

    DeepSpeed (no mpu) treats every rank as data-parallel, so the `sp_size` ranks that share one
    sequence count as `sp_size` sequences. Three things follow from it: the batch size in the
    DeepSpeed config, the loss scaling that undoes DeepSpeed's gradient average over those ranks
    (`parallel.sequence.sequence_parallel_loss`), and the divisor of the logged mean loss (the trainer).
    """
    return sequences * sp_size
