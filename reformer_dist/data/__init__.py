"""Data pipeline: tokenizers, sharded token stores, and the window loader the trainer reads from.

Modules, one job each (see docs/data.md):
    tokenizers  byte tokenizer, SentencePiece wrapper, ``load_tokenizer(spec)``, tokenizer training
    sources     local text / JSON lines / Parquet files read as documents with ``datasets`` streaming
    shards      shard writer (atomic), manifest, checksums (``verify_store``)
    pipeline    corpus -> tokenised shards with ``datasets.map(num_proc=P)``
    builtin     the embedded default corpus (Python's own standard library, byte level)
    store       ``TokenStore``: memory-mapped reader of a store's splits
    loader      ``WindowLoader``: deterministic, resumable, DP/SP-aware windows for the trainer
"""

from reformer_dist.data.errors import DataError

__all__ = ["DataError"]
