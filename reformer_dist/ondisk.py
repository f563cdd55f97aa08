"""Files on disk: every name the project writes or reads, atomic writes, SHA-256 and the one manifest format.

Each name below is defined here once and imported wherever a folder is written or read. The folders:

    <output.dir>/                  run folder (prepared by training/run_dir.py)
        config.toml                  the resolved run config (`reformer-train --config` accepts it)
        deepspeed_config.json        the generated DeepSpeed dict
        metrics.jsonl, tb/, ranks/   metrics (training/metrics.py)
        model/                       final weights folder (save_pretrained + training_data.json)
        .reformer-train.lock         one run per folder (run_lock.py)
        replaced-<time>/             an earlier run's files, moved aside by a fresh start
        checkpoints/                 checkpoint root (saved: training/checkpointing.py; read: training/resume.py)
            latest                     tag of the newest COMPLETE checkpoint (moved last)
            zero_to_safetensors.py     tools/zero_to_safetensors.py, copied like DeepSpeed's zero_to_fp32.py
            abandoned-<time>/          newer checkpoints moved aside by a resume (or a divergence stop)
            .reformer-ckpt-pin-<pid>-<id>/   hard links to the tag `reformer-ckpt` reads (while it reads)
            step_00000300/             one checkpoint ("tag")
                *_model_states.pt, *_optim_states.pt   DeepSpeed's files
                trainer_state/rank00000.pt             per rank: step, loader position, RNG states
                run_config.json                        resolved run config + batch plan
                MANIFEST.json                          manifest of every file, written last
    universal checkpoint root      `reformer-ckpt reshard` output: latest_universal, reshard.json, <tag>/
    weights folder                 config.json, model.safetensors (or shards + index), checksums.json;
                                   training_data.json (+ tokenizer.model): the tokenizer and data options it was
                                   trained with (data/model_data.py)
    token store                    manifest.json, <split>-00000.bin ..., tokenizer.model (data/)
    tokenizer folder               tokenizer.model, tokenizer.vocab, tokenizer.json (data/tokenizers.py)

Manifest (`write_manifest` / `verify_manifest`): the size and SHA-256 of every listed file, in one format
for checkpoint folders (`MANIFEST.json`: every file of the folder; its presence marks a complete
checkpoint) and weights folders (`checksums.json`: the files the writer names; optional when reading):

    {"format": "reformer_dist.manifest/1", "created": <unix time>,
     "files": {"<path relative to the folder>": {"size": <bytes>, "sha256": "<hex>"}, ...}, ...extra keys}

Files written before the two were merged carry the old format names (`LEGACY_FORMATS`) and still verify.
The token store's own manifest (data/manifest.py) describes shards, not files, but is written and hashed
with the helpers here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# ---------------------------------------------------------------------------------------------- names
# run folder
RUN_CONFIG_TOML = "config.toml"
DEEPSPEED_CONFIG = "deepspeed_config.json"
METRICS = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
RANKS_DIR = "ranks"
MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"
LOCK_NAME = ".reformer-train.lock"
REPLACED_PREFIX = "replaced-"
# checkpoint root
LATEST = "latest"
LATEST_UNIVERSAL = "latest_universal"
RESHARD_INFO = "reshard.json"
ZERO_TO_SAFETENSORS = "zero_to_safetensors.py"
ABANDONED_PREFIX = "abandoned-"
PIN_PREFIX = ".reformer-ckpt-pin-"  # .reformer-ckpt-pin-<pid>-<id>/<tag>/: hard links a reading tool holds
# one checkpoint (tag folder)
TRAINER_STATE_DIR = "trainer_state"
RUN_CONFIG = "run_config.json"
MANIFEST = "MANIFEST.json"
# weights folder (ours and Hugging Face's)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CHECKSUMS = "checksums.json"
HF_BIN_NAME = "pytorch_model.bin"
HF_BIN_INDEX = "pytorch_model.bin.index.json"
TRAINING_DATA = "training_data.json"  # what the weights were trained on: tokenizer identity, document options
# token store and tokenizer folder
STORE_MANIFEST = "manifest.json"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_VOCAB = "tokenizer.vocab"
TOKENIZER_META = "tokenizer.json"
DATASETS_CACHE_PREFIX = ".datasets-cache-"  # the pipeline's Arrow cache inside a store's staging folder

_TAG_RE = re.compile(r"^step_(\d{8,})$")


def tag_for(step: int) -> str:
    """Checkpoint folder name of a step: step_00000300."""
    return f"step_{step:08d}"


def step_of(tag: str) -> int | None:
    """The step of a checkpoint folder name, or None when the name is not one."""
    m = _TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def aside_name(prefix: str) -> str:
    """A folder that files are moved aside into: `replaced-<time>` or `abandoned-<time>`."""
    return prefix + time.strftime("%Y%m%d-%H%M%S")


def rank_state_file(rank: int) -> str:
    """Per-rank trainer state inside a checkpoint: trainer_state/rank00000.pt."""
    return f"{TRAINER_STATE_DIR}/rank{rank:05d}.pt"


def rank_metrics_file(rank: int) -> str:
    """Per-rank metrics in the run folder (logging.rank_files): ranks/rank0.jsonl."""
    return f"{RANKS_DIR}/rank{rank}.jsonl"


def weight_shard_name(index: int, count: int) -> str:
    """Hugging Face's name of weight shard `index` (from 0) of `count`: model-00001-of-00003.safetensors."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def store_shard_name(split: str, index: int) -> str:
    """Token store shard file: train-00000.bin."""
    return f"{split}-{index:05d}.bin"


def is_store_shard(name: str, splits: Iterable[str]) -> bool:
    """Whether a file name is the name of a shard (`store_shard_name`) of one of `splits`."""
    return re.fullmatch(rf"({'|'.join(map(re.escape, splits))})-\d{{5}}\.bin", name) is not None


# ---------------------------------------------------------------------------------------------- errors
class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt or does not fit the run; the message names the file."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A file is missing, truncated or altered; the message names it. (A ValueError too, for callers that
    already catch the ValueError that `load_weights` raised before checksums existed.)"""


# ---------------------------------------------------------------------------------------------- outputs vs inputs
class OverlapError(ValueError):
    """An output folder is, lies inside, or contains one of the inputs it is made from; names both."""


def overlap(out: str | Path, src: str | Path) -> str | None:
    """How path `out` relates to path `src` (symlinks resolved): "is", "is inside", "contains", or None."""
    o, s = Path(out).resolve(), Path(src).resolve()
    if o == s:
        return "is"
    if s in o.parents:
        return "is inside"
    if o in s.parents:
        return "contains"
    return None


def check_out_apart(
    out: str | Path, inputs: Iterable[str | Path | None], *, why: str, containing: bool = True, option: str = "--out"
) -> None:
    """OverlapError, before anything is written, when `out` is one of `inputs`, lies inside one, or (with
    `containing`) contains one: replacing or filling it would change (or delete) the input being read.
    The one check every tool that writes a folder from folders uses (reformer-data, reformer-ckpt)."""
    for item in inputs:
        if item is None:
            continue
        rel = overlap(out, item)
        if rel is None or (rel == "contains" and not containing):
            continue
        what = "the input folder" if Path(item).is_dir() else "the input"
        raise OverlapError(f"{option} {out} {rel} {what} {item}: {why}; choose a folder outside it")


# ---------------------------------------------------------------------------------------------- writing
_TMP_RE = re.compile(r"^\..+\.tmp-\d+$")


def is_atomic_temp(name: str) -> bool:
    """Whether a file name is one `AtomicFile` writes under before its rename (.<name>.tmp-<pid>)."""
    return bool(_TMP_RE.match(name))


def is_temporary(name: str) -> bool:
    """Whether a file name is an unfinished atomic write (ours, or an older `.tmp` suffix)."""
    return is_atomic_temp(name) or name.endswith(".tmp")


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """A binary file that appears at `path` whole or not at all: written under a temporary name beside it,
    then `commit` flushes it to disk, renames it over `path` and flushes the folder; `discard` removes it.
    As a context manager: the file object, committed on success and discarded on an exception."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.file: IO[bytes] = open(self.tmp, "wb")

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> IO[bytes]:
        return self.file

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write `data` (text is UTF-8) to `path` atomically (see `AtomicFile`)."""
    with AtomicFile(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):  # hashlib drops the GIL on large updates
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- manifest
FORMAT = "reformer_dist.manifest/1"
LEGACY_FORMATS = ("reformer_dist.checkpoint-manifest/1", "reformer_dist.weights-checksums/1")
# What a verification failure adds when deleting the manifest is a legitimate way out.
_EDIT_HINT = {CHECKSUMS: f"; if you edited it on purpose, delete {CHECKSUMS} to load it unverified"}


def _hash_all(paths: list[Path], workers: int) -> list[str]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(sha256_file, paths))


def write_manifest(
    folder: str | Path,
    name: str = MANIFEST,
    files: Iterable[str] | None = None,
    extra: dict[str, Any] | None = None,
    workers: int = 4,
) -> Path:
    """Hash `files` (paths relative to `folder`; default every file under it but the manifest itself and
    unfinished writes) into folder/name, atomically. Checkpoints: call on one rank, after every rank wrote."""
    d = Path(folder)
    if files is None:
        rels = sorted(
            str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != name and not is_temporary(p.name)
        )
    else:
        rels = sorted(files)
    digests = _hash_all([d / r for r in rels], workers)
    entries = {r: {"size": (d / r).stat().st_size, "sha256": h} for r, h in zip(rels, digests)}
    body = {"format": FORMAT, "created": time.time(), "files": entries, **(extra or {})}
    atomic_write(d / name, json.dumps(body, indent=1, sort_keys=True) + "\n")
    return d / name


def read_manifest(folder: str | Path, name: str = MANIFEST) -> dict[str, Any]:
    """The parsed folder/name; CheckpointError when it is missing (an incomplete checkpoint) or malformed."""
    m = Path(folder) / name
    if not m.is_file():
        raise CheckpointError(f"{folder}: incomplete checkpoint (no {name}; the save did not finish)")
    try:
        body = json.loads(m.read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{m}: corrupt manifest ({e})") from None
    if (
        not isinstance(body, dict)
        or body.get("format") not in (FORMAT, *LEGACY_FORMATS)
        or not isinstance(body.get("files"), dict)
    ):
        raise CorruptCheckpointError(f"{m}: not a {FORMAT} manifest")
    for rel, meta in body["files"].items():
        # a hand-edited entry must not send verification outside the folder or compare against a string
        parts = Path(rel).parts
        if not rel or Path(rel).is_absolute() or ".." in parts:
            raise CorruptCheckpointError(f"{m}: files[{rel!r}]: expected a path inside {folder}")
        size, digest = (meta.get("size"), meta.get("sha256")) if isinstance(meta, dict) else (None, None)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise CorruptCheckpointError(f"{m}: files[{rel!r}].size: expected an integer >= 0, got {size!r}")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise CorruptCheckpointError(
                f"{m}: files[{rel!r}].sha256: expected 64 lowercase hex digits, got {digest!r}"
            )
    return body


def verify_manifest(folder: str | Path, name: str = MANIFEST, hashes: bool = True, workers: int = 4) -> dict:
    """Check every file folder/name lists: sizes first (cheap), then SHA-256 unless `hashes` is False.

    Raises CorruptCheckpointError naming the first missing, truncated or altered file; returns the manifest.
    """
    d = Path(folder)
    body = read_manifest(d, name)
    files = body["files"]
    for rel, meta in files.items():
        p = d / rel
        if not p.is_file():
            raise CorruptCheckpointError(f"{p}: missing (listed in {d / name})")
        size = p.stat().st_size
        if size != meta["size"]:
            raise CorruptCheckpointError(f"{p}: truncated or altered ({size} bytes, {name} says {meta['size']})")
    if hashes:
        rels = list(files)
        for rel, h in zip(rels, _hash_all([d / r for r in rels], workers)):
            if h != files[rel]["sha256"]:
                raise CorruptCheckpointError(
                    f"{d / rel}: corrupt (SHA-256 differs from {d / name})" + _EDIT_HINT.get(name, "")
                )
    return body


def is_complete(ckpt_dir: str | Path) -> bool:
    """A checkpoint folder is complete once its manifest exists (written after every rank finished)."""
    return (Path(ckpt_dir) / MANIFEST).is_file()


def write_checksums(folder: str | Path, names: list[str]) -> Path:
    """The manifest of a weights folder: `names` (relative paths) into folder/checksums.json."""
    return write_manifest(folder, CHECKSUMS, files=names)


def verify_checksums(folder: str | Path, required: bool = False) -> bool:
    """Verify a weights folder's checksums.json: True when verified, False when there is none (and it is not
    `required`); CorruptCheckpointError naming the first missing, truncated or altered file."""
    if not (Path(folder) / CHECKSUMS).is_file():
        if required:
            raise CorruptCheckpointError(f"{folder}: no {CHECKSUMS}; cannot verify the weights")
        return False
    verify_manifest(folder, CHECKSUMS)
    return True


# ---------------------------------------------------------------------------------------------- weights folder
def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of DIR: model.safetensors, or the shards named by model.safetensors.index.json."""
    d = Path(directory)
    if (d / INDEX_NAME).is_file():
        try:
            index = json.loads((d / INDEX_NAME).read_text())
            names = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CorruptCheckpointError(
                f"{d / INDEX_NAME}: not a valid shard index ({type(e).__name__}: {e})"
            ) from None
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
    # safetensors.torch imports torch: deferred so that the names and manifests above stay cheap to import
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
