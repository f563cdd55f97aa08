"""Reading model weights written by `save_pretrained` / `reformer-ckpt consolidate` (single or sharded safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def load_weights(directory: str | Path, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """State dict from DIR/model.safetensors or the shards named by DIR/model.safetensors.index.json.

    A truncated or corrupt file raises ValueError naming it (safetensors validates its header and sizes).
    """
    from safetensors.torch import load_file

    d = Path(directory)
    files: list[Path]
    if (d / INDEX_NAME).is_file():
        index = json.loads((d / INDEX_NAME).read_text())
        files = [d / f for f in sorted(set(index["weight_map"].values()))]
    elif (d / WEIGHTS_NAME).is_file():
        files = [d / WEIGHTS_NAME]
    else:
        raise FileNotFoundError(f"{d}: no {WEIGHTS_NAME} or {INDEX_NAME}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f), device=map_location))
        except Exception as e:  # safetensors raises its own error types for bad headers/lengths
            raise ValueError(f"{f}: cannot read safetensors file (truncated or corrupt?): {e}") from e
    return state
