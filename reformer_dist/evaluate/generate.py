"""`reformer-generate`'s work: a prompt through the model's cached generation, decoded and made safe to print."""

from __future__ import annotations

import time
import unicodedata
from dataclasses import dataclass

import torch

from reformer_dist.data.tokenizers import Tokenizer
from reformer_dist.evaluate.loading import LoadedModel, ModelInputError

_KEEP = {"\n", "\t"}


def safe_text(text: str) -> str:
    """``text`` with every control character (C0/C1 but newline and tab, DEL, format characters such as bidi
    overrides) written as an escape (``\\x1b``, ``\\u202e``): a model's output never drives the terminal."""
    out = []
    for ch in text:
        if ch in _KEEP or unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co"):
            out.append(ch)
        else:
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
    return "".join(out)


@dataclass
class Generation:
    prompt_tokens: int
    new_ids: list[int]
    text: str  # decoded continuation (raw: pass it through safe_text before printing)
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return len(self.new_ids) / self.seconds if self.seconds > 0 else float("inf")


def generate(
    loaded: LoadedModel,
    tokenizer: Tokenizer,
    prompt: str,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    n_hashes: int | None,
    seed: int,
    hash_seed: int | None = None,
    device: torch.device | str = "cpu",
) -> Generation:
    """Sample ``max_new_tokens`` after ``prompt`` with the cached path (``ReformerLM.generate``)."""
    cfg = loaded.cfg
    ids = tokenizer.encode(prompt) or [tokenizer.eod_id]  # an empty prompt starts a document
    if max(ids) >= cfg.vocab_size:
        raise ModelInputError(f"prompt: token id {max(ids)} outside the model's vocab_size {cfg.vocab_size}")
    fed = len(ids) + max_new_tokens - 1
    if fed > cfg.max_seq_len:
        raise ModelInputError(
            f"prompt ({len(ids)} tokens) + --max-new-tokens {max_new_tokens}: {fed} positions, "
            f"more than the model's {cfg.max_seq_len} (axial_pos_shape {cfg.axial_pos_shape})"
        )
    if n_hashes is not None and "lsh" not in cfg.attn_layers:
        raise ModelInputError(f"--n-hashes {n_hashes}: the model has no LSH layers (attn_layers {cfg.attn_layers})")
    gen = torch.Generator(device=device).manual_seed(seed)
    prompt_ids = torch.tensor([ids], dtype=torch.long, device=device)
    t0 = time.perf_counter()
    out = loaded.model.generate(
        prompt_ids,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        hash_seed=cfg.hash_seed if hash_seed is None else hash_seed,
        generator=gen,
        n_hashes=n_hashes,
        use_cache=True,
    )
    dt = time.perf_counter() - t0
    new = out[0, len(ids) :].tolist()
    return Generation(len(ids), new, tokenizer.decode(new), dt)
