"""Finding, verifying and describing a DeepSpeed checkpoint on disk (no process group, no engine).

A DeepSpeed checkpoint is a ROOT folder holding TAG folders (`reformer-train` writes `step_00000300`,
plain DeepSpeed `global_step300`) and a `latest` file naming the newest tag. One tag holds:

    ZeRO-1/2:  mp_rank_00_model_states.pt (full module in the training dtype + metadata)
               [bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt  (rank r's fp32 master + Adam partition)
    ZeRO-3:    zero_pp_rank_<r>_mp_rank_00_model_states.pt + zero_pp_rank_<r>_mp_rank_00_optim_states.pt
    trainer:   run_config.json, trainer_state/rank*.pt, MANIFEST.json (the manifest of reformer_dist/ondisk.py)

Universal checkpoints (`reformer-ckpt reshard`) are roots with `latest_universal` and a tag folder
holding `zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt` next to copied model-state files.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from reformer_dist.model.config import ReformerConfig
from reformer_dist.ondisk import (
    CONFIG_NAME,
    LATEST,
    MANIFEST,
    PIN_PREFIX,
    RUN_CONFIG,
    CheckpointError,
    CorruptCheckpointError,
    verify_manifest,
)
from reformer_dist.training.deepspeed_config import zero_stage

_MODEL_STATES = re.compile(r"^(zero_pp_rank_\d+_)?mp_rank_\d+_model_states\.pt$")
_OPTIM_STATES = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


@dataclass
class CheckpointRef:
    root: Path
    tag: str

    @property
    def path(self) -> Path:
        return self.root / self.tag


def is_tag_dir(p: Path) -> bool:
    return p.is_dir() and any(_MODEL_STATES.match(f.name) for f in p.iterdir())


def find_checkpoint(ckpt_dir: str | Path, tag: str | None = None, latest_name: str = LATEST) -> CheckpointRef:
    """Resolve CKPT_DIR [--tag T]: a tag folder itself, or a root with a `latest` file (or a single tag)."""
    p = Path(ckpt_dir)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such checkpoint folder")
    if tag is not None:
        if Path(tag).name != tag or tag in ("", ".", ".."):
            raise ValueError(
                f"--tag {tag!r}: expected the name of a tag folder in {p} (e.g. step_00000300), not a path"
            )
        ref = CheckpointRef(p, tag)
        if not ref.path.is_dir():
            raise FileNotFoundError(f"{ref.path}: no such tag folder (tags here: {_tags(p) or 'none'})")
    elif is_tag_dir(p):
        ref = CheckpointRef(p.parent, p.name)
    elif (p / latest_name).is_file():
        named = (p / latest_name).read_text(errors="replace").strip()
        if Path(named).name != named or named in ("", ".", ".."):
            raise CheckpointError(
                f"{p / latest_name}: expected the name of a tag folder in {p}, got {named[:80]!r}; "
                f"pass --tag (tags here: {_tags(p) or 'none'})"
            )
        ref = CheckpointRef(p, named)
        if not ref.path.is_dir():
            raise CheckpointError(f"{p / latest_name}: names tag {ref.tag!r}, but {ref.path} does not exist")
    else:
        tags = _tags(p)
        if len(tags) != 1:
            raise FileNotFoundError(
                f"{p}: not a DeepSpeed checkpoint tag folder and no '{latest_name}' file; "
                f"pass --tag (tags here: {tags or 'none'})"
            )
        ref = CheckpointRef(p, tags[0])
    if not is_tag_dir(ref.path):
        raise FileNotFoundError(f"{ref.path}: no DeepSpeed *_model_states.pt files (not a checkpoint tag folder)")
    return ref


# ---------------------------------------------------------------------------------------------- pinning
def _newest_now(root: Path) -> str:
    try:
        return (root / LATEST).read_text().strip() or "none"
    except OSError:
        try:
            return (_tags(root) or ["none"])[-1]
        except OSError:
            return "none"


def rotated_message(ref: CheckpointRef) -> str:
    """What a checkpoint that vanished while being read means, and what to do."""
    return (
        f"{ref.path}: deleted while being read: a run is rotating the checkpoints in {ref.root} "
        f"(checkpoint.keep_last). Pass --tag {_newest_now(ref.root)} (the newest now) and run again, or stop "
        "the run first"
    )


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file under src into dst (folders made): the files outlive a deletion of src."""
    for dirpath, _, files in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            os.link(Path(dirpath) / f, dst / rel / f)
    if not dst.is_dir() or not src.is_dir():  # src vanished before (or while) it was walked
        raise FileNotFoundError(f"{src}: gone")


def _remove_stale_pins(root: Path) -> None:
    """Pins of reading tools that were killed (their pid is gone): they would keep rotated data on disk."""
    for p in root.glob(f"{PIN_PREFIX}*"):
        try:
            os.kill(int(p.name[len(PIN_PREFIX) :].split("-")[0]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass  # another user's live process


def _pin(ckpt_dir: str | Path, tag: str | None, attempts: int) -> tuple[CheckpointRef, Path | None]:
    """Resolve CKPT_DIR [--tag] and hard-link the tag into a hidden pin folder of its root; None when links
    cannot be made there (another file system, read-only): then it is read in place."""
    for attempt in range(attempts):
        try:
            ref = find_checkpoint(ckpt_dir, tag)
        except (CheckpointError, FileNotFoundError):
            # `latest` named a tag that a rotation just removed, or a tag folder vanished while listed
            if tag is None and attempt < attempts - 1 and (Path(ckpt_dir) / LATEST).is_file():
                time.sleep(0.2)
                continue
            raise
        _remove_stale_pins(ref.root)
        pin = ref.root / f"{PIN_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _link_tree(ref.path, pin / ref.tag)
            if (ref.root / CONFIG_NAME).is_file():  # read_model_config's last resort
                os.link(ref.root / CONFIG_NAME, pin / CONFIG_NAME)
            return ref, pin
        except FileNotFoundError:  # rotated away while being linked
            shutil.rmtree(pin, ignore_errors=True)
            if tag is not None or ref.root == Path(ckpt_dir).parent:
                raise CheckpointError(rotated_message(ref)) from None
        except OSError:
            shutil.rmtree(pin, ignore_errors=True)
            return ref, None
    raise CheckpointError(
        f"{ckpt_dir}: every checkpoint was rotated away while being read ({attempts} tries): a run "
        "saves and deletes checkpoints faster than they can be read; stop it, or raise its "
        "checkpoint.keep_last"
    )


def _still_there(ref: CheckpointRef) -> bool:
    try:
        return ref.path.is_dir() and bool(model_state_files(ref.path))
    except OSError:
        return False


@contextlib.contextmanager
def pinned_checkpoint(
    ckpt_dir: str | Path, tag: str | None = None, attempts: int = 5
) -> Iterator[tuple[CheckpointRef, CheckpointRef]]:
    """(the checkpoint CKPT_DIR [--tag] names, where to read it): a run that rotates checkpoints in the same
    folder may delete the tag while it is read, so its files are pinned with hard links (released on exit).
    A `latest` that moves on before the pin is taken is followed (no --tag). Where no pin can be made, a
    checkpoint that vanishes mid-read raises CheckpointError saying so and which --tag to use, never a raw
    errno or IndexError; messages name the checkpoint's own path, not the pin's."""
    ref, pin = _pin(ckpt_dir, tag, attempts)
    try:
        yield ref, (CheckpointRef(pin, ref.tag) if pin is not None else ref)
    except (OSError, IndexError, CheckpointError, ValueError, RuntimeError) as e:
        if pin is None and not _still_there(ref):
            raise CheckpointError(rotated_message(ref)) from None
        if pin is not None and str(pin) in str(e):
            try:
                renamed = type(e)(str(e).replace(str(pin), str(ref.root)))
            except Exception:  # noqa: BLE001 - an error type that wants other arguments: keep it as it is
                renamed = None
            if renamed is not None:
                raise renamed from None
        raise
    finally:
        if pin is not None:
            shutil.rmtree(pin, ignore_errors=True)


def _tags(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if is_tag_dir(d))


def model_state_files(tag_dir: Path) -> list[Path]:
    return sorted(f for f in tag_dir.iterdir() if _MODEL_STATES.match(f.name))


def optim_state_files(tag_dir: Path) -> list[Path]:
    files = [f for f in tag_dir.iterdir() if _OPTIM_STATES.match(f.name)]
    return sorted(files, key=lambda f: int(_OPTIM_STATES.match(f.name).group(2)))  # type: ignore[union-attr]  # matched above


def verify_files(tag_dir: Path, hashes: bool = True) -> str:
    """Raise CheckpointError naming the first damaged file; returns how it was verified.

    With a trainer MANIFEST.json: sizes + SHA-256 of every listed file. Without one (a plain DeepSpeed
    save): the CRC-32 of every record of every .pt file (catches truncation and flipped bytes, which
    torch.load would silently accept in tensor data).
    """
    if (tag_dir / MANIFEST).is_file():
        verify_manifest(tag_dir, hashes=hashes)
        return f"{MANIFEST} ({'SHA-256' if hashes else 'sizes'})"
    for f in sorted(tag_dir.rglob("*.pt")):
        verify_torch_file(f)
    return "CRC-32 of every .pt record (no MANIFEST.json)"


def verify_torch_file(path: str | Path) -> None:
    """Raise CorruptCheckpointError if a `torch.save` file (zip format) is truncated or fails its CRC-32.

    Reads the whole file once (CRC in C, ~1 GB/s); legacy non-zip pickles are not checked.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CorruptCheckpointError(f"{p}: cannot be read ({e})") from None
    if magic != b"PK\x03\x04":
        if len(magic) < 4 or magic[:1] != b"\x80":  # not a zip and not a legacy pickle either
            raise CorruptCheckpointError(f"{p}: not a torch checkpoint file (truncated or corrupt?)")
        return
    try:
        with zipfile.ZipFile(p) as z:
            for info in z.infolist():
                # torch.save writes a CRC-32 per record unless torch.serialization.set_crc32_options(False)
                # was used (then CRC is 0): such records are read through (size checked) but not CRC-checked.
                with z.open(info) as f:
                    if info.CRC == 0 and info.file_size:
                        f._expected_crc = None  # type: ignore[attr-defined]  # zipfile's private "no CRC to compare"
                    while f.read(1 << 22):
                        pass
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as e:
        raise CorruptCheckpointError(f"{p}: truncated or corrupt ({type(e).__name__}: {e})") from None


def load_meta(path: Path) -> dict[str, Any]:
    """torch.load a DeepSpeed state file memory-mapped (tensors are not read), naming it on failure."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        verify_torch_file(path)  # a truncated / damaged zip says so by name ("Errno 22" from mmap does not)
        raise CorruptCheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


def read_run_data(tag_dir: Path) -> dict[str, Any] | None:
    """The `[data]` section of the run that wrote a checkpoint tag (its run_config.json), None when unrecorded."""
    try:
        data = json.loads((tag_dir / RUN_CONFIG).read_text())["config"]["data"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data if isinstance(data, dict) else None


def read_model_config(ref: CheckpointRef, config: str | Path | None = None) -> tuple[ReformerConfig, str]:
    """The ReformerConfig of a checkpoint and where it came from.

    Order: an explicit file (a ReformerConfig JSON, or a run_config.json); <tag>/run_config.json written by
    reformer-train; <tag>/config.json; <root>/config.json.
    """
    candidates = (
        [Path(config)]
        if config is not None
        else [ref.path / RUN_CONFIG, ref.path / CONFIG_NAME, ref.root / CONFIG_NAME]
    )
    for c in candidates:
        if not c.is_file():
            continue
        try:
            d = json.loads(c.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{c}: not valid JSON ({e})") from None
        if isinstance(d.get("config"), dict) and "model" in d["config"]:  # reformer-train's run_config.json
            d = d["config"]["model"]
        return ReformerConfig.from_dict(d, source=str(c)), str(c)
    if config is not None:
        raise FileNotFoundError(f"{config}: no such config file")
    raise FileNotFoundError(
        f"{ref.path}: no model config found (looked for {', '.join(str(c) for c in candidates)}); "
        "pass --config with a ReformerConfig JSON"
    )


@dataclass
class CheckpointInfo:
    path: str
    tag: str
    step: int | None
    zero_stage: int
    world_size: int
    dtype: str  # training (module) precision
    parameters: int
    size_bytes: int
    files: int
    ds_version: str | None
    offload_optimizer: str | None = None
    universal: bool = False
    model_config: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _precision(ds_config: dict) -> str:
    if (ds_config.get("bf16") or {}).get("enabled"):
        return "bf16"
    if (ds_config.get("fp16") or {}).get("enabled"):
        return "fp16"
    return "fp32"


def describe(ref: CheckpointRef) -> CheckpointInfo:
    """Step, ZeRO stage, world size, parameter count, precision and size of one checkpoint tag."""
    tag_dir = ref.path
    model_files = model_state_files(tag_dir)
    meta = load_meta(model_files[0])
    ds_config = meta.get("ds_config") or {}
    optim = optim_state_files(tag_dir)
    universal = (tag_dir / "zero").is_dir()
    stage = zero_stage(ds_config)
    if optim:
        osd = load_meta(optim[0]).get("optimizer_state_dict", {})
        if "zero_stage" in osd:
            stage = int(osd["zero_stage"])
    param_shapes = meta.get("param_shapes") or []
    if isinstance(param_shapes, dict):
        param_shapes = [param_shapes]
    n_params = sum(int(torch.Size(s).numel()) for group in param_shapes for s in group.values())
    n_params += sum(int(torch.Size(s).numel()) for s in (meta.get("frozen_param_shapes") or {}).values())
    if not n_params and isinstance(meta.get("module"), dict):
        n_params = sum(v.numel() for v in meta["module"].values())
    step = None
    manifest = tag_dir / MANIFEST
    if manifest.is_file():
        try:
            step = json.loads(manifest.read_text()).get("step")
        except json.JSONDecodeError:
            pass
    for key in ("reformer_dist_step", "step", "global_steps"):
        if step is None and isinstance(meta.get(key), int):
            step = meta[key]
    files = [f for f in tag_dir.rglob("*") if f.is_file()]
    offload = ((ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device")
    info = CheckpointInfo(
        path=str(tag_dir),
        tag=ref.tag,
        step=step,
        zero_stage=stage,
        world_size=int(meta.get("dp_world_size", len(optim) or 1)),
        dtype=_precision(ds_config),
        parameters=n_params,
        size_bytes=sum(f.stat().st_size for f in files),
        files=len(files),
        ds_version=meta.get("ds_version"),
        offload_optimizer=offload if offload not in (None, "none") else None,
        universal=universal,
    )
    if optim and not universal and len(optim) != info.world_size:
        info.notes.append(f"{len(optim)} optimizer-state files for world size {info.world_size}: incomplete save?")
    try:
        _, src = read_model_config(ref)
        info.model_config = src
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        info.notes.append(str(e))
    return info
