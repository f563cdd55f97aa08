"""Evaluation: the held-out loss over the same windows every time, and the unigram baseline.

`Evaluator.evaluate` runs `eval.batches` micro-batches per rank of a fresh loader over `data.eval_split`
(so every evaluation sees the same windows) with one fixed hash seed, sums loss and token count over all
ranks and reports nats and bits per token (bits per byte for byte-level stores). With `eval.n_hashes` the
same windows run again with that many LSH rounds (the trained rotations kept, new ones added) and that
loss is reported beside the one at the trained `model.n_hashes`. The unigram baseline is
the entropy of those held-out tokens' own unigram distribution, the best any context-free model could do
on them: computed once (at the first evaluation; a resume restores it) and printed beside every result.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from reformer_dist.config_schema import Section, boolean, int_min, opt, optional
from reformer_dist.data.loader import WindowLoader
from reformer_dist.model.config import ReformerConfig
from reformer_dist.model.loss import IGNORE_INDEX
from reformer_dist.parallel.collectives import all_reduce_host
from reformer_dist.training.engine import Engine
from reformer_dist.training.metrics import Metrics
from reformer_dist.training.train_state import TrainState

log = logging.getLogger(__name__)


@dataclass
class EvalConfig(Section):
    every: int = opt(200, int_min(0), "evaluate every N steps (0 = only at the end)")
    batches: int = opt(8, int_min(1), "micro-batches per rank per evaluation (the same ones every time)")
    at_end: bool = opt(True, boolean, "evaluate after the last step")
    hash_seed: int | None = opt(None, optional(int_min(0)), "fixed LSH hash seed for eval (default model.hash_seed)")
    n_hashes: int | None = opt(
        None,
        optional(int_min(1)),
        "also report the eval loss with this many LSH hash rounds "
        "(trained rounds kept, new ones added); the loss at model.n_hashes is reported too",
    )

    @property
    def evaluates(self) -> bool:
        """Whether the run evaluates at all (and so needs a validation split)."""
        return bool(self.every or self.at_end)


@torch.no_grad()
def score_batch(
    model: Any,
    ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    hash_seed: int,
    n_hashes: int | None = None,
    position_offset: int = 0,
    sequence_parallel: Any = None,
    documents: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's loss [B, L] (fp32, 0 where the label is IGNORE_INDEX) and argmax prediction [B, L] of one batch.

    The one evaluation forward: the trainer's held-out loss (``Evaluator``) and ``reformer-eval`` (windows,
    loss by position, synthetic tasks) both sum these, so their numbers agree on the same windows.
    ``model`` is a ReformerLM or the DeepSpeed engine around one.
    """
    return model(
        ids,
        labels=labels,
        position_offset=position_offset,
        n_hashes=n_hashes,
        hash_seed=hash_seed,
        reduction="none",
        sequence_parallel=sequence_parallel,
        **(documents or {}),
    )


class Evaluator:
    """Evaluates a (DeepSpeed-wrapped) ReformerLM; the unigram baseline it computes once is kept in the
    run's `TrainState` (checkpointed with it).

    model: the model's config (vocabulary, trained hash rounds, default hash seed).
    make_loader: a fresh WindowLoader over the held-out split (made once here when the run evaluates, so
        a split too small fails at the start, not at the first evaluation).
    documents: the model's document inputs for a batch of token ids (`Trainer._documents`).
    """

    def __init__(
        self,
        cfg: EvalConfig,
        model: ReformerConfig,
        make_loader: Callable[[], WindowLoader],
        device: torch.device,
        sequence_parallel: Any,
        documents: Callable[[torch.Tensor], dict[str, Any]],
        byte_level: bool,
    ):
        self.cfg, self.model, self.device = cfg, model, device
        self.make_loader, self.sp = make_loader, sequence_parallel
        self.documents, self.byte_level = documents, byte_level
        self.hash_seed = model.hash_seed if cfg.hash_seed is None else cfg.hash_seed  # one fixed seed, every time
        self.last_eval_step = -1
        self.last_eval: dict[str, Any] | None = None
        if cfg.evaluates:
            make_loader()

    @torch.no_grad()
    def evaluate(self, engine: Engine, state: TrainState, metrics: Metrics) -> dict[str, Any]:
        """Evaluate at `state.step` (collective: every rank calls it); once per step, the record is reused.
        Computes `state.unigram_loss` (the held-out tokens' entropy) the first time."""
        step = state.step
        if self.last_eval_step == step and self.last_eval is not None:
            return self.last_eval
        engine.eval()
        vocab = self.model.vocab_size
        total = torch.zeros(2, dtype=torch.float64)  # loss sum, token count
        hist = torch.zeros(vocab, dtype=torch.float64) if state.unigram_loss is None else None
        # eval.n_hashes: the same windows again with that many rounds (the trained rounds plus new ones)
        want = self.cfg.n_hashes
        rounds = want if want not in (None, self.model.n_hashes) else None  # equal: one pass gives both
        more = torch.zeros(2, dtype=torch.float64)
        passes = [(None, total)] + ([(rounds, more)] if rounds else [])
        batches = iter(self.make_loader())  # a fresh loader: the same windows at every evaluation
        for _ in range(self.cfg.batches):
            b = next(batches)
            ids, labels = b["input_ids"].to(self.device), b["labels"].to(self.device)
            docs = self.documents(ids)
            count = float((labels != IGNORE_INDEX).sum())
            for r, acc in passes:
                losses, _ = score_batch(
                    engine,
                    ids,
                    labels,
                    hash_seed=self.hash_seed,
                    n_hashes=r,
                    position_offset=b["position_offset"],
                    sequence_parallel=self.sp,
                    documents=docs,
                )
                acc += torch.tensor([float(losses.double().sum()), count], dtype=torch.float64)
            if hist is not None:
                valid = b["labels"][b["labels"] != IGNORE_INDEX]
                hist += torch.bincount(valid.flatten(), minlength=vocab).double()
        engine.train()
        all_reduce_host(total)
        if rounds:
            all_reduce_host(more)
        if hist is not None:
            all_reduce_host(hist)
            p = hist[hist > 0] / hist.sum()
            state.unigram_loss = float(-(p * p.log()).sum())
        loss = float(total[0] / total[1].clamp(min=1))
        rec = {
            "step": step,
            "eval_loss": loss,
            "bits_per_token": loss / math.log(2),
            "unigram_loss": state.unigram_loss,
            "eval_tokens": int(total[1]),
        }
        if self.byte_level:
            rec["bits_per_byte"] = rec["bits_per_token"]
        extra = ""
        if want is not None:  # eval_loss stays the loss at the trained rounds (model.n_hashes)
            rec["eval_n_hashes"] = want
            rec["eval_loss_n_hashes"] = float(more[0] / more[1].clamp(min=1)) if rounds else loss
            extra = (
                f" | loss with {want} hash rounds {rec['eval_loss_n_hashes']:.4f} (trained with {self.model.n_hashes})"
            )
        metrics.eval(rec)
        unit = "bits/byte" if "bits_per_byte" in rec else "bits/token"
        log.info(
            f"eval step {step}: loss {loss:.4f} ({rec['bits_per_token']:.3f} {unit}){extra} | "
            f"unigram baseline {state.unigram_loss:.4f} (entropy of the held-out tokens)"
        )
        self.last_eval_step, self.last_eval = step, rec
        return rec
