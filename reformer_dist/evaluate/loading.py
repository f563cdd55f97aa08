"""Loading a trained model for `reformer-eval` / `reformer-generate`: a weights folder or a checkpoint root,
and what it was trained on (tokenizer identity, document options), checked against what it is given.

A weights folder (`reformer-ckpt consolidate` output, a run's `model/`) is read with
`ReformerLM.from_pretrained` (checksums verified). A checkpoint root (or tag folder) is reassembled in memory
by the same code `reformer-ckpt consolidate` uses (nothing is written). What the model was trained on comes
from, in order: the folder's `training_data.json` (data/model_data.py); the run's `config.toml` beside a
run's `model/`; the checkpoint's `run_config.json`. Without any of them, the tokenizer must be given.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reformer_dist.data.errors import DataError
from reformer_dist.data.model_data import read_record, record_from_run_config, record_tokenizer
from reformer_dist.data.tokenizers import Tokenizer, load_tokenizer
from reformer_dist.model.config import ReformerConfig
from reformer_dist.model.reformer import ReformerLM
from reformer_dist.ondisk import CONFIG_NAME, INDEX_NAME, RUN_CONFIG, RUN_CONFIG_TOML, WEIGHTS_NAME, CheckpointError


class ModelInputError(DataError):
    """A model folder that cannot be used as asked (missing, incompatible, another tokenizer); names it."""


@dataclass
class LoadedModel:
    model: ReformerLM
    source: str  # the folder (or checkpoint tag) loaded
    record: dict[str, Any] | None  # what it was trained on (data/model_data.py), None when unknown

    @property
    def cfg(self) -> ReformerConfig:
        return self.model.cfg

    @property
    def tokenizer_identity(self) -> str | None:
        return None if self.record is None else self.record.get("tokenizer")

    @property
    def document_masking(self) -> bool:
        return bool(self.record and self.record.get("document_masking"))

    @property
    def reset_positions(self) -> bool:
        return bool(self.record and self.record.get("reset_positions"))

    def tokenizer(self, override: str | None = None) -> Tokenizer:
        """The model's tokenizer; ``override`` ('bytes', 'symbols:<V>', a tokenizer folder or a store) must
        match a recorded identity, and is required when none is recorded."""
        if override is not None:
            tok = _tokenizer_from(override)
            if self.tokenizer_identity is not None and tok.identity != self.tokenizer_identity:
                raise ModelInputError(
                    f"--tokenizer {override}: is {tok.identity}, but {self.source} was trained with "
                    f"{self.tokenizer_identity} ({(self.record or {}).get('_where')})"
                )
            self.check_vocab(tok.vocab_size, f"--tokenizer {override}")
            return tok
        if self.record is None:
            raise ModelInputError(
                f"{self.source}: does not record its tokenizer (no training_data.json, and no run "
                "config beside it); pass --tokenizer bytes, or the tokenizer folder or store it "
                "was trained with"
            )
        tok = record_tokenizer(self.record)
        self.check_vocab(tok.vocab_size, self.record["_where"])
        return tok

    def check_vocab(self, vocab_size: int, what: str) -> None:
        """ModelInputError when ids of a vocabulary of ``vocab_size`` do not fit the model's embedding."""
        if vocab_size > self.cfg.vocab_size:
            raise ModelInputError(
                f"{what}: vocabulary of {vocab_size} ids, but the model {self.source} has "
                f"vocab_size {self.cfg.vocab_size}: not the data it was trained on"
            )


def _tokenizer_from(spec: str) -> Tokenizer:
    """A tokenizer from 'bytes' / 'symbols:<V>' / a tokenizer folder / a token store folder."""
    from reformer_dist.data.store import TokenStore  # the store reads numpy shards: only when a store is named

    p = Path(spec)
    if p.is_dir() and (p / "manifest.json").is_file():
        return TokenStore.from_folder(p).tokenizer
    if spec == "builtin":
        return load_tokenizer("bytes")
    return load_tokenizer(spec)


def is_weights_folder(p: Path) -> bool:
    return (p / CONFIG_NAME).is_file() and ((p / WEIGHTS_NAME).is_file() or (p / INDEX_NAME).is_file())


def load_model(path: str | Path, device: torch.device | str = "cpu", tag: str | None = None) -> LoadedModel:
    """The model at ``path`` (weights folder, checkpoint root or tag folder) in eval mode on ``device``."""
    p = Path(path)
    if not p.exists():
        raise ModelInputError(
            f"{p}: no such folder (expected a weights folder with {CONFIG_NAME} + {WEIGHTS_NAME}, or a checkpoint root)"
        )
    if is_weights_folder(p):
        try:
            model = ReformerLM.from_pretrained(p)
        except (ValueError, FileNotFoundError) as e:
            raise ModelInputError(str(e)) from None
        record = read_record(p) or _record_beside(p)
        source = str(p)
    else:
        model, record, source = _load_checkpoint(p, tag)
    return LoadedModel(model.to(device).eval(), source, record)


def _record_beside(folder: Path) -> dict[str, Any] | None:
    """A run's model/ written before training_data.json existed: the run's config.toml one level up; a
    consolidated folder: the checkpoint it names in its safetensors metadata."""
    toml = folder.parent / RUN_CONFIG_TOML
    if toml.is_file():
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(toml.read_text()).get("data", {})
        except (OSError, ValueError) as e:
            raise ModelInputError(f"{toml}: unreadable run config ({e})") from None
        return record_from_run_config(data, str(toml))
    source = _provenance_source(folder)
    if source is not None and (Path(source) / RUN_CONFIG).is_file():
        return _record_of_tag(Path(source))
    return None


def _provenance_source(folder: Path) -> str | None:
    """The checkpoint a consolidated folder came from (its safetensors metadata), if recorded."""
    from safetensors import safe_open

    f = folder / WEIGHTS_NAME
    if not f.is_file():
        return None
    try:
        with safe_open(str(f), framework="pt") as st:
            meta = st.metadata() or {}
        return json.loads(meta.get("reformer_dist", "{}")).get("source")
    except Exception:  # noqa: BLE001 - provenance is optional; from_pretrained already read the file
        return None


def _record_of_tag(tag_dir: Path) -> dict[str, Any] | None:
    from reformer_dist.checkpoint.deepspeed_ckpt import read_run_data

    data = read_run_data(tag_dir)
    return None if data is None else record_from_run_config(data, str(tag_dir / RUN_CONFIG))


def _load_checkpoint(p: Path, tag: str | None) -> tuple[ReformerLM, dict[str, Any] | None, str]:
    """A checkpoint's fp32 weights, reassembled in memory as `reformer-ckpt consolidate` does."""
    from reformer_dist.checkpoint.consolidate import model_state_dict
    from reformer_dist.checkpoint.deepspeed_ckpt import find_checkpoint, read_model_config, verify_files

    try:
        ref = find_checkpoint(p, tag)
    except (FileNotFoundError, CheckpointError) as e:
        raise ModelInputError(
            f"{e} (expected a weights folder with {CONFIG_NAME} + {WEIGHTS_NAME}, or a checkpoint root)"
        ) from None
    try:
        cfg, _ = read_model_config(ref)
        verify_files(ref.path)
        state = model_state_dict(ref)
    except (FileNotFoundError, CheckpointError) as e:
        raise ModelInputError(str(e)) from None
    model = ReformerLM(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelInputError(
            f"{ref.path}: weights do not match its model config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model, _record_of_tag(ref.path), str(ref.path)
