"""Language-model evaluation over a store split: loss, bits, perplexity and loss by position (`reformer-eval`).

Windows: window i holds tokens ``[start + i*stride, start + i*stride + seq_len + 1)`` (inputs and next-token
labels, as the trainer reads them). The first window scores all seq_len labels; each later one only its
last ``stride`` (the earlier ones were scored already, with less context), so every token is scored once
and, after the first window, with at least ``seq_len - stride`` tokens before it. ``stride = seq_len``
(the default) gives non-overlapping windows: the trainer's evaluation windows when its loader's shift is 0.
Windows that would run past the split's end are left out, as the trainer leaves them out.

Every forward is ``training.evaluation.score_batch`` (the trainer's evaluation forward), under no_grad, one
batch of windows at a time; only per-token losses [B, L] leave the model. A row per hash-round count
(``--n-hashes``) runs the same windows with that many LSH rounds (the trained rotations kept, new ones
added); the row ``full`` runs them with every LSH layer attending to the whole window (shared-QK, the
same masks: the layer's one-chunk rule), which costs O(L^2) and is refused above ``FULL_MAX_LEN``.

Loss by position: position p (1-based) is a label with p tokens of context in its window (the label at
input index i has i + 1). Bins double: 1, 2-3, 4-7, ..., cut at seq_len. Each bin keeps its loss sum and
count, so the bins weighted by their counts give back the row's loss.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from reformer_dist.data.errors import DataError
from reformer_dist.data.store import TokenStore
from reformer_dist.evaluate.loading import LoadedModel, ModelInputError
from reformer_dist.model.loss import IGNORE_INDEX
from reformer_dist.model.reformer import ReformerLM
from reformer_dist.parallel.sequence import document_inputs
from reformer_dist.training.evaluation import score_batch

FULL = "full"
FULL_MAX_LEN = 16384  # "full" rows build L x L logits per head


def position_bins(seq_len: int) -> list[tuple[int, int]]:
    """Log-spaced position bins [lo, hi] (1-based, inclusive): 1, 2-3, 4-7, ..., the last cut at seq_len."""
    bins, lo = [], 1
    while lo <= seq_len:
        bins.append((lo, min(2 * lo - 1, seq_len)))
        lo *= 2
    return bins


def bin_index(positions: torch.Tensor) -> torch.Tensor:
    """Bin of each 1-based position: floor(log2(p))."""
    return torch.floor(torch.log2(positions.double())).long()


@dataclass
class WindowPlan:
    starts: list[int]  # token offset of each window
    scored_from: list[int]  # first input index whose label is scored, per window
    seq_len: int
    stride: int

    @property
    def tokens(self) -> int:
        return sum(self.seq_len - f for f in self.scored_from)


def plan_windows(
    n_tokens: int,
    seq_len: int,
    stride: int | None = None,
    max_tokens: int | None = None,
    start: int = 0,
    where: str = "split",
) -> WindowPlan:
    """The windows of a split of ``n_tokens`` (module docstring); DataError when not even one fits."""
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise DataError(f"--stride {stride}: expected 1..seq_len ({seq_len})")
    if start + seq_len + 1 > n_tokens:
        raise DataError(
            f"{where}: {n_tokens} tokens; a window of --seq-len {seq_len} needs {seq_len + 1}"
            + (f" after --start {start}" if start else "")
        )
    starts: list[int] = []
    scored: list[int] = []
    total = 0
    s = start
    while s + seq_len + 1 <= n_tokens:
        first = 0 if not starts else seq_len - stride
        if max_tokens is not None and starts and total + seq_len - first > max_tokens:
            break
        starts.append(s)
        scored.append(first)
        total += seq_len - first
        s += stride
    return WindowPlan(starts, scored, seq_len, stride)


def full_attention_model(model: ReformerLM, seq_len: int) -> ReformerLM:
    """The same weights with every LSH layer attending to the whole window (one chunk covers it)."""
    cfg = model.cfg
    if seq_len > FULL_MAX_LEN:
        raise ModelInputError(
            f"--n-hashes full: full attention at --seq-len {seq_len} needs L x L logits; allowed up to {FULL_MAX_LEN}"
        )
    local = cfg.local_chunk
    whole = -(-seq_len // local) * local if "local" in cfg.attn_layers else seq_len
    full_cfg = dataclasses.replace(cfg, chunk_len=max(whole, cfg.chunk_len), local_chunk_len=local)
    out = ReformerLM(full_cfg).to(next(model.parameters()).device)
    out.load_state_dict(model.state_dict())
    return out.eval()


def parse_rounds(text: str | None, cfg: Any) -> list[int | str | None]:
    """``--n-hashes 1,2,4,8,full`` -> [1, 2, 4, 8, 'full']; none given -> [None] (the trained rounds)."""
    if not text:
        return [None]
    out: list[int | str | None] = []
    for part in text.split(","):
        part = part.strip()
        if part == FULL:
            out.append(FULL)
        elif part.isdigit() and int(part) >= 1:
            out.append(int(part))
        else:
            raise ModelInputError(
                f"--n-hashes: expected hash-round counts >= 1 and/or 'full' separated by commas, got {part!r}"
            )
    if "lsh" not in cfg.attn_layers:
        raise ModelInputError(f"--n-hashes {text}: the model has no LSH layers (attn_layers {cfg.attn_layers})")
    return out


def check_store(loaded: LoadedModel, store: TokenStore) -> None:
    """ModelInputError when the store was tokenised differently from the model's data, or does not fit it."""
    want = loaded.tokenizer_identity
    if want is not None and want != store.identity:
        raise ModelInputError(
            f"{store.where}: tokenised with {store.identity}, but the model {loaded.source} was "
            f"trained with {want} ({(loaded.record or {}).get('_where')})"
        )
    loaded.check_vocab(store.vocab_size, store.where)


def check_length(loaded: LoadedModel, seq_len: int, what: str = "--seq-len") -> None:
    cfg = loaded.cfg
    if not cfg.causal:
        raise ModelInputError(f"{loaded.source}: causal=false: next-token evaluation needs a causal model")
    if seq_len > cfg.max_seq_len:
        raise ModelInputError(
            f"{what} {seq_len}: the model {loaded.source} covers {cfg.max_seq_len} positions "
            f"(axial_pos_shape {cfg.axial_pos_shape})"
        )


class _Row:
    """Loss sums of one round count: total and per position bin (float64)."""

    def __init__(self, rounds: int | str | None, n_bins: int):
        self.rounds = rounds
        self.sum = torch.zeros(n_bins, dtype=torch.float64)
        self.count = torch.zeros(n_bins, dtype=torch.float64)

    def add(self, losses: torch.Tensor, labels: torch.Tensor) -> None:
        keep = labels != IGNORE_INDEX
        pos = torch.arange(1, labels.shape[1] + 1).expand_as(labels)[keep.cpu()]
        b = bin_index(pos)
        self.sum.index_add_(0, b, losses.detach().cpu().double()[keep.cpu()])
        self.count.index_add_(0, b, torch.ones_like(b, dtype=torch.float64))


def row_record(row: _Row, bins: list[tuple[int, int]], byte_level: bool) -> dict[str, Any]:
    loss = float(row.sum.sum() / row.count.sum().clamp(min=1))
    rec: dict[str, Any] = {
        "n_hashes": row.rounds,
        "loss": loss,
        "bits_per_token": loss / math.log(2),
        "perplexity": math.exp(min(loss, 700.0)),
        "tokens": int(row.count.sum()),
    }
    if byte_level:
        rec["bits_per_byte"] = rec["bits_per_token"]
    rec["by_position"] = [
        {"lo": lo, "hi": hi, "tokens": int(c), "loss": float(s / c) if c else None}
        for (lo, hi), s, c in zip(bins, row.sum.tolist(), row.count.tolist())
    ]
    return rec


def evaluate_lm(
    loaded: LoadedModel,
    store: TokenStore,
    split: str,
    seq_len: int,
    *,
    stride: int | None = None,
    rounds: list[int | str | None] | None = None,
    hash_seed: int | None = None,
    batch_size: int = 1,
    max_tokens: int | None = None,
    start: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Loss, bits and perplexity of ``loaded`` on ``split`` of ``store``, one row per entry of ``rounds``."""
    rounds = rounds or [None]
    check_store(loaded, store)
    check_length(loaded, seq_len)
    plan = plan_windows(store.num_tokens(split), seq_len, stride, max_tokens, start, where=f"{store.name} {split!r}")
    seed = loaded.cfg.hash_seed if hash_seed is None else hash_seed
    models = {r: (full_attention_model(loaded.model, seq_len) if r == FULL else loaded.model) for r in rounds}
    bins = position_bins(seq_len)
    rows = [_Row(r, len(bins)) for r in rounds]
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(plan.starts) * len(rounds),
        unit="window",
        disable=not progress,
        dynamic_ncols=True,
        desc="reformer-eval",
    )
    for i in range(0, len(plan.starts), batch_size):
        idx = range(i, min(i + batch_size, len(plan.starts)))
        toks = torch.stack(
            [torch.from_numpy(store.read(split, plan.starts[j], seq_len + 1).astype("int64")) for j in idx]
        ).to(device)
        ids, labels = toks[:, :-1], toks[:, 1:].clone()
        for row_i, j in enumerate(idx):
            labels[row_i, : plan.scored_from[j]] = IGNORE_INDEX
        docs = document_inputs(ids, store.eod_id, loaded.reset_positions) if loaded.document_masking else None
        for row in rows:
            n = row.rounds if isinstance(row.rounds, int) else None  # None: the trained count; FULL: no hashing
            losses, _ = score_batch(models[row.rounds], ids, labels, hash_seed=seed, n_hashes=n, documents=docs)
            row.add(losses, labels)
            bar.update(len(idx))
    bar.close()
    byte_level = store.identity == "bytes"
    return {
        "format": "reformer_dist.eval/1",
        "model": loaded.source,
        "store": store.name,
        "split": split,
        "tokenizer": store.identity,
        "unit": "byte" if byte_level else "token",
        "seq_len": seq_len,
        "stride": plan.stride,
        "start": start,
        "windows": len(plan.starts),
        "hash_seed": seed,
        "trained_n_hashes": loaded.cfg.n_hashes,
        "attn_layers": loaded.cfg.attn_layers,
        "document_masking": loaded.document_masking,
        "seconds": round(time.perf_counter() - t0, 3),
        "rows": [row_record(r, bins, byte_level) for r in rows],
    }
