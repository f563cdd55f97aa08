"""What is in a checkpoint folder, without loading tensors: `reformer-ckpt inspect PATH`.

PATH may be a DeepSpeed checkpoint (root with `latest`, or one tag folder), a universal checkpoint
(root with `latest_universal`), a weights folder of ours (config.json + safetensors, e.g. consolidate
output) or a Hugging Face Reformer folder (export-hf output). Reports step, ZeRO stage, world size,
parameter count, dtype and size on disk; for weights folders also whether the checksums verify.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reformer_dist.checkpoint.deepspeed_ckpt import describe, find_checkpoint, rotated_message
from reformer_dist.ondisk import (
    CHECKSUMS,
    CONFIG_NAME,
    INDEX_NAME,
    LATEST,
    LATEST_UNIVERSAL,
    MANIFEST,
    RESHARD_INFO,
    WEIGHTS_NAME,
    CheckpointError,
    CorruptCheckpointError,
    verify_checksums,
    verify_manifest,
    weight_files,
)


def _dir_size(p: Path) -> tuple[int, int]:
    files = [f for f in p.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files), len(files)


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON): no tensor is read."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptCheckpointError(f"{path}: truncated (no safetensors header)")
        n = int.from_bytes(raw, "little")
        if n > 100 * 2**20 or n > path.stat().st_size - 8:
            raise CorruptCheckpointError(f"{path}: corrupt safetensors header length {n}")
        try:
            return json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptCheckpointError(f"{path}: corrupt safetensors header ({e})") from None


def inspect_weights_dir(d: Path, verify: bool = True) -> dict[str, Any]:
    files = weight_files(d)
    n_params = 0
    dtypes: dict[str, int] = {}
    meta: dict[str, Any] = {}
    for f in files:
        header = _safetensors_header(f)
        meta = header.pop("__metadata__", None) or meta
        for entry in header.values():
            numel = 1
            for s in entry["shape"]:
                numel *= s
            n_params += numel
            dtypes[entry["dtype"]] = dtypes.get(entry["dtype"], 0) + numel
    size, n_files = _dir_size(d)
    cfg = json.loads((d / CONFIG_NAME).read_text()) if (d / CONFIG_NAME).is_file() else {}
    kind = "huggingface" if cfg.get("model_type") == "reformer" else "reformer_dist"
    out: dict[str, Any] = {
        "kind": f"weights folder ({kind})",
        "path": str(d),
        "parameters": n_params,
        "dtype": ", ".join(sorted(dtypes)) or "none",
        "size_bytes": size,
        "files": n_files,
        "weight_files": [f.name for f in files],
    }
    prov = meta.get("reformer_dist") if isinstance(meta, dict) else None
    if prov:
        p = json.loads(prov)
        out.update(
            {
                "step": p.get("step"),
                "zero_stage": p.get("zero_stage"),
                "world_size": p.get("world_size"),
                "source": p.get("source"),
            }
        )
    if verify:
        try:
            out["checksums"] = "verified" if verify_checksums(d) else f"none ({CHECKSUMS} absent)"
        except CorruptCheckpointError as e:
            out["checksums"] = f"FAILED: {e}"
    return out


def inspect_path(path: str | Path, tag: str | None = None, verify: bool = True) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    if p.is_dir() and ((p / WEIGHTS_NAME).is_file() or (p / INDEX_NAME).is_file()):
        return inspect_weights_dir(p, verify)
    universal_root = p.is_dir() and (p / LATEST_UNIVERSAL).is_file() and not (p / LATEST).is_file()
    ref = find_checkpoint(p, tag, latest_name=LATEST_UNIVERSAL if universal_root else LATEST)
    try:
        if (ref.path / MANIFEST).is_file():
            verify_manifest(ref.path, hashes=False)  # sizes: a truncated file is named before it is opened
        info = describe(ref).to_dict()
    except (OSError, IndexError, CheckpointError):
        if not ref.path.is_dir():  # a run rotated it away while it was read: say so, not errno / IndexError
            raise CheckpointError(rotated_message(ref)) from None
        raise
    info["kind"] = "DeepSpeed universal checkpoint" if info["universal"] else "DeepSpeed ZeRO checkpoint"
    reshard_json = ref.root / RESHARD_INFO
    if info["universal"] and reshard_json.is_file():
        r = json.loads(reshard_json.read_text())
        info.update(
            {
                "source_world_size": r.get("source_world_size"),
                "source_zero_stage": r.get("source_zero_stage"),
                "load_as_zero_stage": r.get("load_as_zero_stage"),
            }
        )
    return info


def format_report(info: dict[str, Any]) -> str:
    order = [
        "kind",
        "path",
        "tag",
        "step",
        "zero_stage",
        "world_size",
        "parameters",
        "dtype",
        "size_bytes",
        "files",
        "offload_optimizer",
        "ds_version",
        "model_config",
        "weight_files",
        "source",
        "source_zero_stage",
        "source_world_size",
        "load_as_zero_stage",
        "checksums",
        "notes",
    ]
    lines = []
    for k in order + [k for k in info if k not in order and k != "universal"]:
        v = info.get(k)
        if v is None or v == [] or k == "universal":
            continue
        if k == "size_bytes":
            v = f"{v} ({v / 2**20:.2f} MiB)"
        elif k == "parameters":
            v = f"{v:,}"
        lines.append(f"{k:>18}: {v}")
    return "\n".join(lines)
