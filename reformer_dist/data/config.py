"""[data]: which token store a run reads and how it cuts windows (read by the trainer's loaders and
`reformer-train`'s checks before any process group starts)."""

from __future__ import annotations

from dataclasses import dataclass

from reformer_dist.config_schema import Section, boolean, choice, int_min, opt, optional, string


@dataclass
class DataConfig(Section):
    path: str = opt("builtin", string, "token store folder (`reformer-data` prepares one) or 'builtin'")
    tokenizer: str | None = opt(None, optional(string), "refuse a store whose tokenizer differs from this name")
    seq_len: int = opt(1024, int_min(2), "tokens per training window")
    seed: int = opt(0, int_min(0), "window shuffling seed")
    train_split: str = opt("train", choice("train", "validation"), "split trained on")
    eval_split: str = opt("validation", choice("train", "validation"), "held-out split evaluated on")
    document_masking: bool = opt(
        False,
        boolean,
        "a token attends only to tokens of its own document (documents "
        "end with the store's end-of-document id; windows pack several)",
    )
    reset_positions: bool = opt(
        False, boolean, "position embeddings restart at each document (needs data.document_masking)"
    )

    def rules(self) -> None:
        if self.reset_positions and not self.document_masking:
            self.fail("reset_positions", "needs data.document_masking = true (positions restart per document)")
