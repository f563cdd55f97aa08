"""`ReformerConfig`: the validated description of one Reformer language model (the run config's [model]).

Only architecture lives here (what the weights mean), plus `attention_backend`, which picks the
attention core that computes it; training, data and parallelism have their own sections. Fields are
declared and checked the way every config section is (reformer_dist/config_schema.py): each bad value
raises a ``ValueError`` naming the field, before any tensor is allocated.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from reformer_dist.config_schema import (
    ListOf,
    Section,
    all_of,
    at_least,
    choice,
    nonneg_number,
    of_type,
    opt,
    positive_number,
)
from reformer_dist.kernels.backends import BACKENDS, Backend
from reformer_dist.ondisk import atomic_write

AttentionKind = Literal["lsh", "local", "full"]  # what one layer's attention is (``attn_layers``)
ATTN_TYPES: tuple[AttentionKind, ...] = get_args(AttentionKind)
# config.json key recording how the weights were trained on packed documents ({"document_masking": bool,
# "reset_positions": bool}, the run's [data] settings): not architecture, but what the weights expect at
# inference and what an export must not drop. `from_dict` skips it; `trained_with` reads it.
TRAINED_WITH = "trained_with"
DOCUMENT_SETTINGS = ("document_masking", "reset_positions")
Activation = Literal["relu", "gelu", "silu"]
ACTIVATIONS: tuple[Activation, ...] = get_args(Activation)
# head_groups = 0: sequences of at least this many tokens recompute attention one head per group (memory), shorter
# ones all heads at once (speed); docs/sequence_parallel.md "Head groups"
HEAD_GROUPS_FROM = 65536


def _int(lo: int) -> Any:
    return all_of(of_type(int), at_least(lo))


def _n_buckets(v: Any) -> str | None:
    factors = v if isinstance(v, (list, tuple)) else [v]
    ok = v is None or (len(factors) >= 1 and all(isinstance(f, int) and f >= 2 and f % 2 == 0 for f in factors))
    return None if ok else "expected None, an even integer >= 2, or a list of even integers >= 2"


def _axial_shape(v: Any) -> str | None:
    if len(v) == 2 and all(x >= 1 for x in v):
        return None
    return "expected two positive integers [a, b] (max sequence length a*b)"


def _dropout(v: Any) -> str | None:
    return None if 0.0 <= v < 1.0 else "expected 0 <= p < 1"


@dataclass
class ReformerConfig(Section):
    """Architecture of a Reformer LM. Defaults give a small causal byte-level model.

    Reversible stacks carry two residual streams of width ``d_model`` each (HF layout); the final
    LayerNorm and LM head see their concatenation (``2 * d_model``).
    """

    vocab_size: int = opt(256, _int(1), "token ids 0..vocab_size-1")
    d_model: int = opt(256, _int(1), "width of each residual stream (= n_heads * d_head)")
    n_heads: int = opt(4, _int(1), "attention heads")
    d_head: int = opt(64, _int(1), "width of one head")
    d_ff: int = opt(1024, _int(1), "feed-forward hidden width")
    n_layers: int = opt(2, _int(1), "layers (each: attention + feed-forward)")
    # None (the default) is filled in by __post_init__: the annotations give the types after it (here: a list)
    attn_layers: list[AttentionKind] = opt(
        None, of_type(ListOf(str), None), "one of 'lsh', 'local', 'full' per layer; default all 'lsh'"
    )
    # LSH attention
    n_hashes: int = opt(2, _int(1), "LSH rounds")
    chunk_len: int = opt(64, _int(1), "LSH chunk length")
    n_chunks_before: int = opt(1, _int(0), "chunks before each chunk that LSH attention looks at")
    n_chunks_after: int = opt(0, _int(0), "chunks after (0 for a causal model)")
    n_buckets: int | list[int] | None = opt(
        None,
        all_of(of_type(int, ListOf(int), None), _n_buckets),
        "buckets: none = from the sequence length (HF rule), an int, or factors",
    )
    same_bucket_only: bool = opt(False, of_type(bool), "paper's mask: attend only within the same bucket (HF does not)")
    allow_duplicate_attention: bool = opt(True, of_type(bool), "false = subtract log(#occurrences) (paper/trax)")
    hash_seed: int = opt(0, _int(0), "base seed of the hash rotations; the trainer offsets it per step")
    # local attention (HF "local"); None = same as the LSH values
    local_chunk_len: int | None = opt(
        None, all_of(of_type(int, None), at_least(1)), "local attention chunk length (default chunk_len)"
    )
    local_n_chunks_before: int = opt(1, _int(0), "chunks before, local attention")
    local_n_chunks_after: int = opt(0, _int(0), "chunks after, local attention (0 for a causal model)")
    # model
    causal: bool = opt(True, of_type(bool), "causal language model")
    reversible: bool = opt(True, of_type(bool), "reversible residual stack (activations recomputed in backward)")
    dropout: float = opt(0.0, all_of(of_type(float), _dropout), "dropout probability")
    activation: Activation = opt("relu", all_of(of_type(str), choice(*ACTIVATIONS)), "feed-forward activation")
    layer_norm_eps: float = opt(1e-12, all_of(of_type(float), positive_number), "LayerNorm epsilon")
    ff_chunk_len: int = opt(
        4096,
        _int(0),
        "tokens per feed-forward chunk (0 = no chunking); also the token chunk "
        "of a head group's projections (head_groups)",
    )
    loss_chunk_len: int = opt(4096, _int(1), "tokens per LM-head/cross-entropy chunk")
    head_groups: int = opt(
        0,
        _int(0),
        "head groups of the attention block's reversible recompute and backward "
        "(must divide n_heads); 0 = by length: 1 below 65536 tokens, else one head "
        "per group (per Ulysses rank)",
    )
    axial_pos_shape: list[int] = opt(
        [64, 64], all_of(of_type(ListOf(int)), _axial_shape), "axial position shape [a, b]: sequences up to a*b tokens"
    )
    axial_pos_dims: list[int] = opt(
        None,
        of_type(ListOf(int), None),  # None: filled in by __post_init__
        "widths of the two axial embeddings (sum d_model; default halves)",
    )
    init_std: float = opt(0.02, all_of(of_type(float), nonneg_number), "std of the weight init")
    axial_norm_std: float = opt(
        0.02,
        all_of(of_type(float), nonneg_number),
        "std of the axial position init (HF uses 1.0, which drowns 0.02-scale token embeddings)",
    )
    # runtime, not architecture: which attention core computes every layer (same function, other memory/speed)
    attention_backend: Backend = opt(
        "auto",
        all_of(of_type(str), choice(*BACKENDS)),
        "attention core: auto (triton on CUDA when it takes the call, else blockwise), reference, blockwise, triton",
    )

    def __post_init__(self) -> None:
        self.check_fields()  # the values as given, before the defaults below fill them in
        if self.attn_layers is None:
            self.attn_layers = ["lsh"] * self.n_layers
        self.attn_layers = list(self.attn_layers)
        self.axial_pos_shape = list(self.axial_pos_shape)
        if self.axial_pos_dims is None:
            self.axial_pos_dims = [self.d_model // 2, self.d_model - self.d_model // 2]
        self.axial_pos_dims = list(self.axial_pos_dims)
        if isinstance(self.n_buckets, tuple):
            self.n_buckets = list(self.n_buckets)
        self.rules()

    # ------------------------------------------------------------------ validation
    def rules(self) -> None:
        """The rules between fields; each broken one raises naming the field."""

        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                self.fail(name, f"{msg} (got {getattr(self, name)!r})")

        need(
            len(self.attn_layers) == self.n_layers,
            "attn_layers",
            f"expected a list of {self.n_layers} entries (one per layer, n_layers={self.n_layers})",
        )
        for t in self.attn_layers:
            need(t in ATTN_TYPES, "attn_layers", f"unknown layer type {t!r}; expected one of {ATTN_TYPES}")
        need(
            self.d_model == self.n_heads * self.d_head,
            "d_model",
            f"must equal n_heads * d_head = {self.n_heads} * {self.d_head} = {self.n_heads * self.d_head}",
        )
        need(
            len(self.axial_pos_dims) == 2
            and all(x >= 1 for x in self.axial_pos_dims)
            and sum(self.axial_pos_dims) == self.d_model,
            "axial_pos_dims",
            f"expected two positive integers summing to d_model={self.d_model}",
        )
        need(
            self.head_groups == 0 or self.n_heads % self.head_groups == 0,
            "head_groups",
            f"expected 0 (by length) or a divisor of n_heads={self.n_heads}",
        )
        if self.causal:
            need(
                self.n_chunks_after == 0,
                "n_chunks_after",
                "must be 0 for a causal model (it would only see masked keys)",
            )
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

    def head_groups_for(self, seq_len: int, ulysses: int = 1) -> int:
        """Head groups of the reversible attention recompute for a (whole, padded) sequence of ``seq_len`` tokens
        whose heads are split over ``ulysses`` ranks: ``head_groups`` if set, else 1 below
        ``HEAD_GROUPS_FROM`` tokens (the attention term is small there and fewer, larger kernels are faster),
        else ``n_heads / ulysses`` (one head per group on each rank: the least memory). Raises ValueError when
        a set value does not divide the heads of one rank (each group is split evenly over the Ulysses ranks).
        """
        per_rank = self.n_heads // ulysses
        if self.head_groups:
            if per_rank % self.head_groups:
                raise ValueError(
                    f"head_groups: {self.head_groups} must divide the {per_rank} heads of each of the "
                    f"{ulysses} Ulysses ranks (n_heads={self.n_heads})"
                )
            return self.head_groups
        return 1 if seq_len < HEAD_GROUPS_FROM else per_rank

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "ReformerConfig":
        """Build from a dict, rejecting unknown keys by name (`TRAINED_WITH` is read by `trained_with`)."""
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k != TRAINED_WITH}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown ReformerConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    @staticmethod
    def trained_with(path: str | Path) -> dict[str, bool]:
        """The document settings a config.json records (`TRAINED_WITH`); {} when it records none. A value of
        the wrong type raises ValueError naming the key."""
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        got = d.get(TRAINED_WITH) if isinstance(d, dict) else None
        if got is None:
            return {}
        if not isinstance(got, dict) or any(not isinstance(got.get(k, False), bool) for k in DOCUMENT_SETTINGS):
            raise ValueError(
                f"{path}: {TRAINED_WITH}: expected {{'document_masking': true|false, "
                f"'reset_positions': true|false}}, got {got!r}"
            )
        return {k: bool(got.get(k, False)) for k in DOCUMENT_SETTINGS}

    def save(self, path: str | Path) -> None:
        atomic_write(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ReformerConfig":
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e})") from e
        if not isinstance(d, dict):
            raise ValueError(f"{p}: expected a JSON object of ReformerConfig fields, got {type(d).__name__}")
        return cls.from_dict(d, source=str(p))
