"""[output]: what a finished run leaves besides its checkpoints: the final weights folder
(`save_pretrained`, loadable with `ReformerLM.from_pretrained`, plus `training_data.json`: the tokenizer and
data options it was trained with) and a generated sample."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reformer_dist.config_schema import Section, any_string, boolean, int_min, opt, optional, positive_number, string
from reformer_dist.data.model_data import record_files
from reformer_dist.data.tokenizers import Tokenizer
from reformer_dist.parallel.collectives import barrier
from reformer_dist.training.engine import Engine


@dataclass
class OutputConfig(Section):
    dir: str = opt("runs/default", string, "run folder: resolved config, metrics.jsonl, tb/, checkpoints/, model/")
    save_model: bool = opt(True, boolean, "write the final weights with save_pretrained to <output.dir>/model")
    sample_tokens: int = opt(0, int_min(0), "print a generated sample of this many tokens at the end (0 = none)")
    sample_prompt: str = opt("", any_string, "prompt of the final sample")
    sample_temperature: float = opt(0.8, positive_number, "sampling temperature of the final sample")
    sample_top_k: int | None = opt(None, optional(int_min(1)), "top-k of the final sample")


def _gathered(engine: Engine, zero_stage: int) -> contextlib.AbstractContextManager:
    """Context in which every rank sees full parameters (ZeRO-3 gathers them; a no-op otherwise)."""
    if zero_stage == 3:
        # deepspeed logs its accelerator choice when imported, and the run config (which must load
        # quietly, before anything starts) imports this module for OutputConfig
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def save_model(
    engine: Engine,
    zero_stage: int,
    out: Path,
    main: bool,
    tokenizer: Tokenizer | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    """The engine's model as a weights folder (rank 0 writes; every rank calls this), with the record of its
    tokenizer and `[data]` options (data/model_data.py) when they are given; the document settings among those
    options also go into its config.json (`trained_with`: what an export must not drop)."""
    with _gathered(engine, zero_stage):
        if main:
            trained_with = (
                None if data is None else {k: bool(data.get(k, False)) for k in ("document_masking", "reset_positions")}
            )
            # the record of its data goes in with the weights: one atomic write, in checksums.json
            record = None if tokenizer is None else record_files(tokenizer, data or {}, engine.module.cfg.vocab_size)
            engine.module.save_pretrained(out, trained_with=trained_with, extra_files=record)
    barrier()


@torch.no_grad()
def sample(
    engine: Engine,
    zero_stage: int,
    cfg: OutputConfig,
    tokenizer: Tokenizer,
    device: torch.device,
    seed: int,
    hash_seed: int,
    main: bool,
) -> str:
    """`cfg.sample_tokens` generated after `cfg.sample_prompt`, decoded (rank 0; every rank calls this)."""
    prompt = tokenizer.encode(cfg.sample_prompt) or [tokenizer.eod_id]
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    model = engine.module
    model.eval()
    text = ""
    # ZeRO-3: every rank must run the same forwards (each gathers parameters); otherwise rank 0 alone.
    if zero_stage == 3 or main:
        gen = torch.Generator(device=device).manual_seed(seed)
        # the cache holds at most max_seq_len positions; beyond them full recompute slides a window
        fits = len(prompt) + cfg.sample_tokens - 1 <= model.cfg.max_seq_len
        out = model.generate(
            ids,
            cfg.sample_tokens,
            temperature=cfg.sample_temperature,
            top_k=cfg.sample_top_k,
            hash_seed=hash_seed,
            generator=gen,
            use_cache=fits,
        )
        text = tokenizer.decode(out[0, len(prompt) :].tolist())
    model.train()
    barrier()
    return text
