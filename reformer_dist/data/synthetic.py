"""Synthetic long-range tasks as token stores, deterministic by seed (`reformer-data synth`).

duplication (the Reformer paper's task, section 5): a document is ``0 w 0 w``: ``w`` is ``n`` symbols drawn
    uniformly from 1..N, so its length is L = 2n + 2. Tokens are abstract symbols (tokenizer
    ``symbols:<N + 2>``: ids 0..N, end-of-document N + 1). The answer is the copied half: the second ``w``,
    predictable only by looking back n + 1 positions.
passkey (needle retrieval): a document is L bytes of filler text (a fixed paragraph repeated) with a needle
    ``The pass key is 48213. Remember it. 48213 is the pass key.`` starting at depth d (0 = the start of
    the document, 1 = just before the question), and ends with ``What is the pass key? The pass key is
    48213``. The answer is the key's digits at the end (tokenizer ``bytes``): everything else is
    predictable from the nearby text, so a model gets them right only by retrieving the needle.

The validation split is a grid: for each length, each depth (passkey) and ``examples`` examples, in that
order; the train split holds ``train_examples`` examples whose lengths cycle through the list and whose
depths are uniform in [0, 1]. Each split draws from its own generator seeded by (seed, split), so the same
seed gives the same bytes and another seed other examples. The manifest's metadata (``synthetic``) holds
every parameter; ``task_layout`` gives back, from it alone, where each validation example lies and which
of its tokens are the answer (what ``reformer-eval --task`` scores).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reformer_dist.data.errors import DataError, UsageError
from reformer_dist.data.manifest import MANIFEST
from reformer_dist.data.tokenizers import ByteTokenizer, SymbolTokenizer, Tokenizer
from reformer_dist.data.writer import ShardWriter

TASKS = ("duplication", "passkey")
FORMAT = 1
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is {key}"
_SPLIT_IDS = {"train": 0, "validation": 1}


@dataclass
class SynthSpec:
    """One synthetic store: the task and its parameters (all recorded in the manifest)."""

    task: str
    lengths: list[int]
    examples: int = 8  # validation examples per cell (length x depth)
    train_examples: int = 0
    seed: int = 0
    n_symbols: int = 128  # duplication: symbols 1..N
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # passkey
    key_digits: int = 5  # passkey

    def check(self) -> None:
        """UsageError naming the option that cannot make a store."""
        if self.task not in TASKS:
            raise UsageError(f"--task: expected one of {TASKS}, got {self.task!r}")
        if not self.lengths:
            raise UsageError("--lengths: expected at least one length")
        if self.examples < 1 or self.train_examples < 0:
            raise UsageError(
                f"--examples must be >= 1 and --train-examples >= 0 (got {self.examples}, {self.train_examples})"
            )
        if self.task == "duplication":
            if not 1 <= self.n_symbols <= 65533:
                raise UsageError(f"--symbols: expected 1..65533, got {self.n_symbols}")
            bad = [n for n in self.lengths if n < 4 or n % 2]
            if bad:
                raise UsageError(f"--lengths {bad}: duplication documents are 0 w 0 w, an even length >= 4")
        else:
            if not 1 <= self.key_digits <= 32:
                raise UsageError(f"--key-digits: expected 1..32, got {self.key_digits}")
            if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
                raise UsageError(f"--depths {list(self.depths)}: expected fractions in [0, 1]")
            short = [n for n in self.lengths if n < passkey_fixed_len(self.key_digits)]
            if short:
                raise UsageError(
                    f"--lengths {short}: a passkey document needs at least "
                    f"{passkey_fixed_len(self.key_digits)} bytes (needle + question)"
                )

    def tokenizer(self) -> Tokenizer:
        return SymbolTokenizer(self.n_symbols + 2) if self.task == "duplication" else ByteTokenizer()

    def metadata(self) -> dict[str, Any]:
        m = {
            "format": FORMAT,
            "task": self.task,
            "lengths": list(self.lengths),
            "examples": self.examples,
            "train_examples": self.train_examples,
            "seed": self.seed,
        }
        if self.task == "duplication":
            m["n_symbols"] = self.n_symbols
        else:
            m.update(
                depths=list(self.depths), key_digits=self.key_digits, filler=FILLER, needle=NEEDLE, question=QUESTION
            )
        return m


# ---------------------------------------------------------------------------------------------- documents
def duplication_doc(rng: np.random.Generator, length: int, n_symbols: int) -> np.ndarray:
    """``0 w 0 w`` of ``length`` tokens, w uniform over 1..n_symbols."""
    w = rng.integers(1, n_symbols + 1, size=length // 2 - 1)
    return np.concatenate([[0], w, [0], w]).astype(np.int64)


def passkey_fixed_len(key_digits: int) -> int:
    """Bytes of the needle and the question (a document is these plus filler)."""
    key = "0" * key_digits
    return len(NEEDLE.format(key=key)) + len(QUESTION.format(key=key))


def needle_start(length: int, depth: float, key_digits: int) -> int:
    """Byte offset of the needle in a passkey document of ``length`` bytes at ``depth``."""
    return int(round(depth * (length - passkey_fixed_len(key_digits))))


def passkey_doc(rng: np.random.Generator, length: int, depth: float, key_digits: int) -> np.ndarray:
    """The bytes of one passkey document (filler, needle at ``depth``, filler, question with the key)."""
    key = "".join(str(d) for d in rng.integers(0, 10, size=key_digits))
    filler_len = length - passkey_fixed_len(key_digits)
    filler = (FILLER * (filler_len // len(FILLER) + 1))[:filler_len]
    at = needle_start(length, depth, key_digits)
    text = filler[:at] + NEEDLE.format(key=key) + filler[at:] + QUESTION.format(key=key)
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8).astype(np.int64)


def _split_docs(spec: SynthSpec, split: str) -> list[np.ndarray]:
    rng = np.random.default_rng([spec.seed, _SPLIT_IDS[split]])
    docs = []
    if split == "validation":
        for length in spec.lengths:
            for depth in spec.depths if spec.task == "passkey" else (None,):
                for _ in range(spec.examples):
                    docs.append(_doc(spec, rng, length, depth))
    else:
        for i in range(spec.train_examples):
            length = spec.lengths[i % len(spec.lengths)]
            depth = float(rng.random()) if spec.task == "passkey" else None
            docs.append(_doc(spec, rng, length, depth))
    return docs


def _doc(spec: SynthSpec, rng: np.random.Generator, length: int, depth: float | None) -> np.ndarray:
    if spec.task == "duplication":
        return duplication_doc(rng, length, spec.n_symbols)
    assert depth is not None  # every passkey document is given its depth
    return passkey_doc(rng, length, depth, spec.key_digits)


def write_synthetic(spec: SynthSpec, out_dir: str | Path, overwrite: bool = False, shard_tokens: int = 1 << 27) -> Path:
    """Write the store of ``spec`` (validated first) to ``out_dir``; returns its manifest path."""
    spec.check()
    tok = spec.tokenizer()
    with ShardWriter(
        out_dir, tok, shard_tokens, overwrite=overwrite, metadata={"synthetic": spec.metadata()}
    ) as writer:
        for split in ("train", "validation"):
            for doc in _split_docs(spec, split):
                writer.add(split, np.append(doc, tok.eod_id))
    return Path(out_dir) / MANIFEST


# ---------------------------------------------------------------------------------------------- layout
@dataclass
class Cell:
    """The validation examples of one (length, depth): where they start and which tokens are the answer."""

    length: int
    depth: float | None  # passkey depth; None for duplication
    starts: list[int]  # token offset of each example in the validation split
    answer: tuple[int, int]  # [first, end) token indices of the answer inside an example


def synthetic_metadata(manifest: dict[str, Any], where: str) -> dict[str, Any]:
    """The store's ``synthetic`` metadata; DataError naming the store when it is not a synthetic store."""
    meta = (manifest.get("metadata") or {}).get("synthetic")
    if not isinstance(meta, dict) or meta.get("task") not in TASKS:
        raise DataError(
            f"{where}: not a synthetic task store (no metadata.synthetic.task; make one with "
            "`reformer-data synth --task duplication|passkey`)"
        )
    if meta.get("format") != FORMAT:
        raise DataError(f"{where}: synthetic store format {meta.get('format')!r}, expected {FORMAT}")
    return meta


def task_layout(meta: dict[str, Any]) -> list[Cell]:
    """The validation split's cells, in the order ``write_synthetic`` wrote them."""
    cells, offset = [], 0
    for length in meta["lengths"]:
        for depth in meta["depths"] if meta["task"] == "passkey" else (None,):
            starts = [offset + i * (length + 1) for i in range(meta["examples"])]  # + 1: end-of-document
            offset += meta["examples"] * (length + 1)
            if meta["task"] == "duplication":
                answer = (length // 2 + 1, length)  # the second w
            else:
                answer = (length - meta["key_digits"], length)  # the key at the end of the question
            cells.append(Cell(length, depth, starts, answer))
    return cells


def layout_tokens(meta: dict[str, Any]) -> int:
    """Tokens the validation split must hold for ``task_layout``."""
    return sum(len(c.starts) * (c.length + 1) for c in task_layout(meta))
