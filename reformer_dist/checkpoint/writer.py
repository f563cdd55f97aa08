"""Writing a weights folder: config.json + model.safetensors (or shards + index) + checksums.json, atomically.

Everything goes to a temporary sibling folder first and is renamed into place last, so an interrupted
run never leaves a folder that looks complete. Shards follow the Hugging Face naming
(`model-00001-of-00003.safetensors` + `model.safetensors.index.json`), which both
`ReformerLM.from_pretrained` and `transformers` read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from reformer_dist.ondisk import (
    CHECKSUMS,
    CONFIG_NAME,
    INDEX_NAME,
    WEIGHTS_NAME,
    check_out_apart,
    fsync_dir,
    weight_shard_name,
    write_checksums,
)

DEFAULT_MAX_SHARD = "5GB"
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500*2**20, 1234 -> 1234."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"max shard size: cannot parse {text!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def shard_state(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split in key order into groups of at most max_bytes (a larger tensor gets a shard of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        n = _nbytes(v)
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    return shards


def _fresh_tmp(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else set-and-restore."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give `folder` and everything in it the modes a plain mkdir/open would have had.

    mkdtemp makes 0700 folders, and safetensors writes 0600 files: colleagues on a shared file
    system could not read a consolidated or exported model.
    """
    mask = current_umask()
    for p in [*folder.rglob("*"), folder]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def _is_weights_file(name: str) -> bool:
    """A file a weights folder's writer owns (replaced or removed by the next write into it)."""
    return name in (CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME, CHECKSUMS) or bool(_SHARD_RE.match(name))


def _merge(tmp: Path, out: Path) -> None:
    """Move the files of `tmp` into the existing folder `out` one by one (each rename atomic), leaving files
    that are not a weights folder's alone: checksums.json last, after the weights of an earlier write that
    the new ones do not replace are gone (a crash in between is reported as a checksum mismatch on load)."""
    new = {p.name for p in tmp.iterdir()}
    for name in sorted(new - {CHECKSUMS}):
        os.replace(tmp / name, out / name)
    for p in out.iterdir():
        if _is_weights_file(p.name) and p.name not in new:
            p.unlink()
    if CHECKSUMS in new:
        os.replace(tmp / CHECKSUMS, out / CHECKSUMS)
    tmp.rmdir()
    fsync_dir(out)


def _commit(tmp: Path, out: Path, overwrite: bool | str) -> None:
    if overwrite == "merge" and out.is_dir():
        _merge(tmp, out)
        return
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif overwrite:
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    os.replace(tmp, out)


def check_writable(out: str | Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> None:
    """Fail early (before hours of work, before anything is written): `out` equal to, inside or containing
    one of `inputs` (OverlapError, even without overwrite), or a non-empty folder while overwrite is off."""
    check_out_apart(out, inputs, why="writing there would replace or delete the input it is read from")
    p = Path(out)
    if p.exists() and not overwrite and not (p.is_dir() and not any(p.iterdir())):
        raise FileExistsError(f"{p}: exists and is not empty (pass --overwrite to replace it)")


def write_weights_dir(
    out_dir: str | Path,
    state: dict[str, torch.Tensor],
    config: dict,
    *,
    max_shard_size: str | int = DEFAULT_MAX_SHARD,
    metadata: dict[str, str] | None = None,
    extra_files: dict[str, str | bytes] | None = None,
    overwrite: bool | str = False,
    inputs: Iterable[str | Path | None] = (),
) -> list[Path]:
    """Write config.json (`config` as JSON), the weights and checksums.json into out_dir.

    Returns the weight files written (their final paths). `metadata` goes into every safetensors header
    ("format": "pt" is always set: transformers refuses files without it); `extra_files` are further small
    files (name -> text or bytes), checksummed too. `inputs`: the folders/files the weights were read from
    (refused as `out_dir`, or inside or around it: see `check_writable`). `overwrite="merge"` (save_pretrained):
    an existing folder keeps its other files; only the weights folder's own files are replaced.
    """
    out = Path(out_dir)
    check_writable(out, bool(overwrite), inputs)
    tmp = _fresh_tmp(out)
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
        for name, content in (extra_files or {}).items():
            (tmp / name).write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        meta = {"format": "pt", **(metadata or {})}
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        shards = shard_state(state, parse_size(max_shard_size))
        names = [WEIGHTS_NAME] if len(shards) == 1 else [weight_shard_name(i, len(shards)) for i in range(len(shards))]
        for name, shard in zip(names, shards):
            save_file(shard, str(tmp / name), metadata=meta)
        listed = [CONFIG_NAME, *names, *(extra_files or {})]
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(_nbytes(v) for v in state.values())},
                "weight_map": {k: name for name, shard in zip(names, shards) for k in shard},
            }
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            listed.append(INDEX_NAME)
        write_checksums(tmp, listed)
        apply_umask(tmp)
        _commit(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out / n for n in names]


__all__ = ["DEFAULT_MAX_SHARD", "apply_umask", "check_writable", "parse_size", "shard_state", "write_weights_dir"]
