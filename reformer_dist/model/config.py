"""`ReformerConfig`: the validated description of one Reformer language model.

Only architecture lives here (what the weights mean); training, data and parallelism have their own
configs. Every check raises ``ValueError`` naming the field, before any tensor is allocated.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ATTN_TYPES = ("lsh", "local", "full")
ACTIVATIONS = ("relu", "gelu", "silu")
# attention cores (kernels.chunked_attention): "auto" picks the fused kernel on CUDA, else a PyTorch core
ATTENTION_BACKENDS = ("auto", "reference", "blockwise", "triton")


@dataclass
class ReformerConfig:
    """Architecture of a Reformer LM. Defaults give a small causal byte-level model.

    Reversible stacks carry two residual streams of width ``d_model`` each (HF layout); the final
    LayerNorm and LM head see their concatenation (``2 * d_model``).
    """

    vocab_size: int = 256
    d_model: int = 256
    n_heads: int = 4
    d_head: int = 64
    d_ff: int = 1024
    n_layers: int = 2
    attn_layers: list[str] | None = None  # one per layer; None -> all "lsh"
    # LSH attention
    n_hashes: int = 2
    chunk_len: int = 64
    n_chunks_before: int = 1
    n_chunks_after: int = 0
    n_buckets: int | list[int] | None = None  # None = from sequence length (HF rule), int, or factors
    same_bucket_only: bool = False  # paper's P_i mask; HF does not mask
    allow_duplicate_attention: bool = True  # False = subtract log(#occurrences) (paper/trax)
    hash_seed: int = 0  # base seed of the hash rotations; the trainer offsets it per step
    # local attention (HF "local"); None = same as the LSH values
    local_chunk_len: int | None = None
    local_n_chunks_before: int = 1
    local_n_chunks_after: int = 0
    # model
    causal: bool = True
    reversible: bool = True
    dropout: float = 0.0
    activation: str = "relu"
    layer_norm_eps: float = 1e-12
    ff_chunk_len: int = 4096  # tokens per feed-forward chunk (0 = no chunking)
    loss_chunk_len: int = 4096  # tokens per LM-head/cross-entropy chunk
    axial_pos_shape: list[int] = field(default_factory=lambda: [64, 64])
    axial_pos_dims: list[int] | None = None  # None -> split d_model in halves
    init_std: float = 0.02
    axial_norm_std: float = 0.02  # HF uses 1.0, which drowns 0.02-scale token embeddings in small models
    # runtime, not architecture: which attention core computes every layer (same function, other memory/speed)
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.attn_layers is None:
            self.attn_layers = ["lsh"] * self.n_layers
        self.attn_layers = list(self.attn_layers)
        self.axial_pos_shape = [int(x) for x in self.axial_pos_shape]
        if self.axial_pos_dims is None and isinstance(self.d_model, int):
            self.axial_pos_dims = [self.d_model // 2, self.d_model - self.d_model // 2]
        if self.axial_pos_dims is not None:
            self.axial_pos_dims = [int(x) for x in self.axial_pos_dims]
        if isinstance(self.n_buckets, (list, tuple)):
            self.n_buckets = [int(x) for x in self.n_buckets]
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""

        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"ReformerConfig.{name}: {msg} (got {getattr(self, name)!r})")

        def pos_int(name: str, minimum: int = 1) -> None:
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= minimum, name,
                 f"expected an integer >= {minimum}")

        for name in ("vocab_size", "d_model", "n_heads", "d_head", "d_ff", "n_layers", "n_hashes", "chunk_len"):
            pos_int(name)
        for name in ("n_chunks_before", "n_chunks_after", "local_n_chunks_before", "local_n_chunks_after",
                     "ff_chunk_len", "hash_seed"):
            pos_int(name, 0)
        pos_int("loss_chunk_len")
        if self.local_chunk_len is not None:
            pos_int("local_chunk_len")
        need(isinstance(self.attn_layers, list) and len(self.attn_layers) == self.n_layers, "attn_layers",
             f"expected a list of {self.n_layers} entries (one per layer, n_layers={self.n_layers})")
        for t in self.attn_layers:
            need(t in ATTN_TYPES, "attn_layers", f"unknown layer type {t!r}; expected one of {ATTN_TYPES}")
        need(self.d_model == self.n_heads * self.d_head, "d_model",
             f"must equal n_heads * d_head = {self.n_heads} * {self.d_head} = {self.n_heads * self.d_head}")
        need(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0, "dropout", "expected 0 <= p < 1")
        need(self.activation in ACTIVATIONS, "activation", f"expected one of {ACTIVATIONS}")
        need(self.attention_backend in ATTENTION_BACKENDS, "attention_backend", f"expected one of {ATTENTION_BACKENDS}")
        need(isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0, "layer_norm_eps",
             "expected a positive number")
        need(len(self.axial_pos_shape) == 2 and all(x >= 1 for x in self.axial_pos_shape), "axial_pos_shape",
             "expected two positive integers [a, b] (max sequence length a*b)")
        need(self.axial_pos_dims is not None and len(self.axial_pos_dims) == 2
             and all(x >= 1 for x in self.axial_pos_dims) and sum(self.axial_pos_dims) == self.d_model,
             "axial_pos_dims", f"expected two positive integers summing to d_model={self.d_model}")
        nb = self.n_buckets
        if nb is not None:
            factors = nb if isinstance(nb, list) else [nb]
            need(len(factors) >= 1 and all(isinstance(f, int) and f >= 2 and f % 2 == 0 for f in factors),
                 "n_buckets", "expected None, an even integer >= 2, or a list of even integers >= 2")
        if self.causal:
            need(self.n_chunks_after == 0, "n_chunks_after", "must be 0 for a causal model (it would only see masked keys)")
            need(self.local_n_chunks_after == 0, "local_n_chunks_after", "must be 0 for a causal model")

    # ------------------------------------------------------------------ derived values
    @property
    def max_seq_len(self) -> int:
        """Longest sequence the axial position embeddings cover."""
        return self.axial_pos_shape[0] * self.axial_pos_shape[1]

    @property
    def local_chunk(self) -> int:
        return self.local_chunk_len if self.local_chunk_len is not None else self.chunk_len

    def pad_multiple(self) -> int:
        """Sequence lengths are padded internally to a multiple of this (lcm of the chunk lengths in use)."""
        m = 1
        for t in set(self.attn_layers):
            if t == "lsh":
                m = math.lcm(m, self.chunk_len)
            elif t == "local":
                m = math.lcm(m, self.local_chunk)
        return m

    def bucket_factors(self, seq_len: int) -> list[int]:
        """Bucket factors for a (padded) sequence length; their product is the number of buckets.

        ``None`` follows HF's rule: the largest power of two <= 2L/chunk_len, factorised into two
        near-equal powers of two once it exceeds 2*max(sqrt(max_seq_len/chunk_len), chunk_len),
        which keeps hashing memory O(L*sqrt(nb)).
        """
        if isinstance(self.n_buckets, list):
            return list(self.n_buckets)
        if isinstance(self.n_buckets, int):
            return [self.n_buckets]
        p = max((2 * (seq_len // self.chunk_len)).bit_length() - 1, 1)
        nb = 2**p
        limit = 2 * max(int((self.max_seq_len // self.chunk_len) ** 0.5), self.chunk_len)
        if nb > limit:
            return [2 ** (p // 2), 2 ** (p - p // 2)]
        return [nb]

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "ReformerConfig":
        """Build from a dict, rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown ReformerConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ReformerConfig":
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e})") from e
        return cls.from_dict(d, source=str(p))
