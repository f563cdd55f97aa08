"""Data pipeline: tokenizers, sharded token stores, and the window loader the trainer reads from.

Modules, one job each (see docs/data.md):
    tokenizers  byte tokenizer, SentencePiece wrapper, ``load_tokenizer(spec)``, tokenizer training
    sources     local text / JSON lines / Parquet files read as documents with ``datasets`` streaming
    manifest    the store format: what ``manifest.json`` says about splits and shards
    writer      ``ShardWriter``: staged, atomic, verified store writes
    verify      size check at open, full check (sha256, token range) by ``verify_store``
    pipeline    corpus -> tokenised shards with ``datasets.map(num_proc=P)``
    builtin     the embedded default corpus (Python's own standard library, byte level) as arrays
    synthetic   synthetic long-range tasks (duplication, passkey) as stores, and where their answers lie
    model_data  what a model was trained on (tokenizer identity, document options), kept with its weights
    store       ``TokenStore``: reader of a store's splits, from a folder (memory-mapped) or arrays
    loader      ``WindowLoader``: deterministic, resumable, DP/SP-aware windows for the trainer
"""

from reformer_dist.data.errors import DataError

__all__ = ["DataError"]
