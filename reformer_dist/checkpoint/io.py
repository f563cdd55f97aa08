"""Reading model weights written by `save_pretrained` / `reformer-ckpt consolidate` (single or sharded safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from reformer_dist.checkpoint.checksums import CorruptCheckpointError, verify_checksums

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of DIR: model.safetensors, or the shards named by model.safetensors.index.json."""
    d = Path(directory)
    if (d / INDEX_NAME).is_file():
        try:
            index = json.loads((d / INDEX_NAME).read_text())
            names = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CorruptCheckpointError(f"{d / INDEX_NAME}: not a valid shard index ({type(e).__name__}: {e})") from None
        return [d / n for n in names]
    if (d / WEIGHTS_NAME).is_file():
        return [d / WEIGHTS_NAME]
    raise FileNotFoundError(f"{d}: no {WEIGHTS_NAME} or {INDEX_NAME}")


def load_weights(directory: str | Path, map_location: str = "cpu", *, verify: bool = True) -> dict[str, torch.Tensor]:
    """State dict from DIR/model.safetensors or the shards named by DIR/model.safetensors.index.json.

    When DIR holds `checksums.json` (written by `reformer-ckpt`), every file it lists is verified first
    (`verify=False` skips the hashing). A truncated or corrupt file raises CorruptCheckpointError (a
    ValueError) naming it; without checksums safetensors still catches bad headers and truncation.
    """
    from safetensors.torch import load_file

    d = Path(directory)
    files = weight_files(d)
    if verify:
        verify_checksums(d)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise CorruptCheckpointError(f"{f}: missing (named by {d / INDEX_NAME})")
        try:
            state.update(load_file(str(f), device=map_location))
        except Exception as e:  # safetensors raises its own error types for bad headers/lengths
            raise CorruptCheckpointError(f"{f}: cannot read safetensors file (truncated or corrupt?): {e}") from e
    return state
