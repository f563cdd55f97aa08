"""Exact scoring of the synthetic tasks (data/synthetic.py): `reformer-eval --task`.

Each validation example runs alone, from position 0, through the trainer's evaluation forward
(``training.evaluation.score_batch``) with labels only on its answer tokens, teacher-forced as in the
Reformer paper: the answer token at index t counts as right when the model's argmax after tokens 0..t-1
is that token. Per (length, depth) cell: ``accuracy`` (answer tokens right / answer tokens), ``exact``
(examples with every answer token right / examples) and the mean loss on the answer tokens.
Chance is 1/N per copied symbol (duplication) and 1/10 per key digit (passkey).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from reformer_dist.data.errors import DataError
from reformer_dist.data.store import TokenStore
from reformer_dist.data.synthetic import layout_tokens, synthetic_metadata, task_layout
from reformer_dist.evaluate.lm import FULL, check_length, check_store, full_attention_model
from reformer_dist.evaluate.loading import LoadedModel
from reformer_dist.model.loss import IGNORE_INDEX
from reformer_dist.training.evaluation import score_batch


def answer_labels(docs: np.ndarray, answer: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [B, L] (the documents without their end-of-document id) and labels that are IGNORE_INDEX except at
    the inputs that predict the answer tokens ``[first, end)`` of each document [B, L + 1]."""
    ids = torch.from_numpy(docs[:, :-1].astype(np.int64))
    labels = torch.full_like(ids, IGNORE_INDEX)
    a, e = answer
    labels[:, a - 1 : e - 1] = torch.from_numpy(docs[:, a:e].astype(np.int64))
    return ids, labels


def score_answers(preds: torch.Tensor, labels: torch.Tensor) -> tuple[int, int, int]:
    """(answer tokens right, answer tokens, examples with all answer tokens right) of predictions [B, L]."""
    keep = labels != IGNORE_INDEX
    right = (preds == labels) & keep
    per_example = right.sum(1) == keep.sum(1)
    return int(right.sum()), int(keep.sum()), int(per_example.sum())


def evaluate_task(
    loaded: LoadedModel,
    store: TokenStore,
    *,
    split: str = "validation",
    rounds: list[int | str | None] | None = None,
    hash_seed: int | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy on the answers of every validation cell of a synthetic store, one row per round count."""
    rounds = rounds or [None]
    meta = synthetic_metadata(store.manifest, store.where)
    if split != "validation":
        raise DataError(
            f"--split {split}: --task scores the validation split (the grid of lengths x depths); "
            "the train split's examples are not laid out for scoring"
        )
    check_store(loaded, store)
    cells = task_layout(meta)
    need = layout_tokens(meta)
    if store.num_tokens(split) != need:
        raise DataError(
            f"{store.where}: split {split!r} has {store.num_tokens(split)} tokens, its synthetic "
            f"metadata describes {need}: not the store `reformer-data synth` wrote"
        )
    longest = max(c.length for c in cells)
    check_length(loaded, longest, "the store's longest example,")
    seed = loaded.cfg.hash_seed if hash_seed is None else hash_seed
    models = {r: (full_attention_model(loaded.model, longest) if r == FULL else loaded.model) for r in rounds}
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    bar = tqdm(
        total=sum(len(c.starts) for c in cells) * len(rounds),
        unit="example",
        disable=not progress,
        dynamic_ncols=True,
        desc="reformer-eval --task",
    )
    rows = []
    for r in rounds:
        out: list[dict[str, Any]] = []
        for c in cells:
            right = total = exact = 0
            loss_sum = 0.0
            for i in range(0, len(c.starts), batch_size):
                docs = np.stack([store.read(split, s, c.length + 1) for s in c.starts[i : i + batch_size]])
                if (docs[:, -1] != store.eod_id).any():
                    raise DataError(
                        f"{store.where}: an example of length {c.length} does not end where the "
                        "synthetic metadata says: not the store `reformer-data synth` wrote"
                    )
                ids, labels = answer_labels(docs, c.answer)
                ids, labels = ids.to(device), labels.to(device)
                n = r if isinstance(r, int) else None  # None: the trained count; FULL: no hashing
                losses, preds = score_batch(models[r], ids, labels, hash_seed=seed, n_hashes=n)
                a, b, e = score_answers(preds, labels)
                right, total, exact = right + a, total + b, exact + e
                loss_sum += float(losses.double().sum())
                bar.update(len(docs))
            out.append(
                {
                    "length": c.length,
                    "depth": c.depth,
                    "examples": len(c.starts),
                    "accuracy": right / total,
                    "exact": exact / len(c.starts),
                    "answer_loss": loss_sum / total,
                    "answer_tokens": total,
                }
            )
        tokens = sum(x["answer_tokens"] for x in out)
        rows.append(
            {"n_hashes": r, "accuracy": sum(x["accuracy"] * x["answer_tokens"] for x in out) / tokens, "cells": out}
        )
    bar.close()
    chance = 1 / meta["n_symbols"] if meta["task"] == "duplication" else 0.1
    return {
        "format": "reformer_dist.task_eval/1",
        "task": meta["task"],
        "model": loaded.source,
        "store": store.name,
        "split": split,
        "hash_seed": seed,
        "trained_n_hashes": loaded.cfg.n_hashes,
        "attn_layers": loaded.cfg.attn_layers,
        "chance": chance,
        "seconds": round(time.perf_counter() - t0, 3),
        "rows": rows,
    }
