"""Corpus sources: local text, JSON lines and Parquet files, read as documents with ``datasets`` streaming.

Streaming keeps memory flat however large the corpus. Files are read in the order given (folders:
sorted, recursively, hidden entries skipped), each document tagged with the file it came from so that
every error can name it.

Formats, by file name: ``.jsonl``/``.json``/``.ndjson`` (optionally ``.gz``/``.bz2``/``.xz``/``.zst``)
-> JSON, one document per record, text in ``text_field``; ``.parquet`` -> one document per row;
anything else -> plain text, one document per file (``text_unit="document"``), per paragraph or per line.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from reformer_dist.data.errors import DataError

TEXT_UNITS = ("document", "paragraph", "line")
_COMPRESSION = ("", ".gz", ".bz2", ".xz", ".zst")
_JSON = tuple(ext + c for ext in (".jsonl", ".json", ".ndjson") for c in _COMPRESSION)
_PARQUET = (".parquet",)


class Document(NamedTuple):
    text: str
    source: str  # file it came from
    index: int  # type: ignore[assignment]  # a field, shadowing tuple.index; record/row (or paragraph/line) number within that file, from 0


def file_format(path: str | Path) -> str:
    """'json', 'parquet' or 'text', from the file name."""
    name = Path(path).name.lower()
    if name.endswith(_JSON):
        return "json"
    if name.endswith(_PARQUET):
        return "parquet"
    return "text"


def collect_files(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand files, folders (recursive, sorted, hidden skipped) and glob patterns into a file list."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        s = str(item)
        if any(ch in s for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(s, recursive=True))
            if not matches:
                raise DataError(f"{s}: pattern matches no file")
            files.extend(p for p in matches if p.is_file())
        elif Path(s).is_dir():
            root = Path(s)
            found = sorted(
                p
                for p in root.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
            )
            if not found:
                raise DataError(f"{s}: empty corpus: folder holds no files")
            files.extend(found)
        elif Path(s).is_file():
            files.append(Path(s))
        else:
            raise DataError(f"{s}: no such file or folder")
    if not files:
        raise DataError(f"empty corpus: no input files in {list(map(str, inputs))}")
    return files


def iter_documents(
    files: Sequence[str | Path], text_field: str = "text", text_unit: str = "document", cache_dir: str | None = None
) -> Iterator[Document]:
    """Stream the documents of ``files`` in order. Empty documents are skipped.

    cache_dir: where ``datasets`` may put its (small) lock files; default its own ~/.cache folder.
    """
    # datasets takes ~1.5 s to import: only reading a corpus (sharding, tokenizer training) needs it
    import datasets

    # Local files only: without this, every load pings the Hub's download counter, and on an
    # offline node each ping waits for a DNS/connect failure (~0.15 s x files).
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    if text_unit not in TEXT_UNITS:
        raise ValueError(f"text_unit must be one of {TEXT_UNITS} (got {text_unit!r})")
    paths = [str(f) for f in files]
    groups: dict[str, list[str]] = {}
    for p in paths:
        groups.setdefault(file_format(p), []).append(p)
    streams = {}
    for fmt, group in groups.items():
        kwargs = {"sample_by": text_unit} if fmt == "text" else {}
        try:
            streams[fmt] = datasets.load_dataset(
                fmt, data_files=group, split="train", streaming=True, cache_dir=cache_dir, **kwargs
            )
        except Exception as e:  # noqa: BLE001 - datasets raises many types; name the files
            for p in group if fmt == "json" else ():
                found = locate_damage(p)
                if found:  # name the damaged file and where, not the whole group
                    raise DataError(f"{p}: cannot read as json: {found}") from e
            raise DataError(f"{group[0] if len(group) == 1 else group}: cannot open as {fmt}: {e}") from e
    position = {fmt: 0 for fmt in groups}
    for path in paths:
        fmt = file_format(path)
        ds, k = streams[fmt], position[fmt]
        position[fmt] += 1
        # Streaming datasets hold one shard per data file, in order: shard k is this file alone.
        if ds.num_shards != len(groups[fmt]):
            raise DataError(f"{path}: datasets split {len(groups[fmt])} {fmt} files into {ds.num_shards} shards")
        yield from _file_documents(ds.shard(num_shards=ds.num_shards, index=k), path, fmt, text_field)


def _file_documents(rows, path: str, fmt: str, text_field: str) -> Iterator[Document]:
    field = "text" if fmt == "text" else text_field
    i = -1
    try:
        for i, row in enumerate(rows):
            text = row.get(field)
            if text is None:
                present = sorted(k for k, v in row.items() if v is not None)
                raise DataError(f"{path}: record {i} has no text field {field!r} (fields: {present}); use --text-field")
            if not isinstance(text, str):
                raise DataError(f"{path}: record {i}: field {field!r} is {type(text).__name__}, not text")
            if text:
                yield Document(text, path, i)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - decoding/parsing errors from datasets/pyarrow
        where = "before its first record" if i < 0 else f"after record {i}, counting from 0"
        why = (
            " - not UTF-8 text (a binary file, or another encoding: convert it, e.g. with iconv)"
            if isinstance(e, UnicodeDecodeError)
            else ""
        )
        found = locate_damage(path) if fmt == "json" and not why else None
        if found:  # pyarrow parses in blocks: its "before its first record" may be the last line of a small file
            raise DataError(f"{path}: cannot read as json: {found}") from e
        raise DataError(f"{path}: cannot read as {fmt} ({where}){why}: {type(e).__name__}: {e}") from e


_OPENERS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}


def locate_damage(path: str | Path) -> str | None:
    """Where a JSON-lines file is damaged, found by reading it line by line (only after a parse error):
    "line N (record N-1): not valid JSON (...)", saying when it is a cut last line or a cut compressed
    file; None when it is not JSON lines (a single JSON document) or the damage is not found."""
    import importlib
    import json

    p = Path(path)
    module = _OPENERS.get(p.suffix.lower())
    opener = importlib.import_module(module).open if module else open
    n, ended = 0, True
    try:
        with opener(p, "rt", encoding="utf-8") as f:
            first = True
            for n, line in enumerate(f, start=1):
                if first and line.lstrip().startswith("["):
                    return None  # one JSON array, not JSON lines
                first = False
                ended = line.endswith("\n")
                if not line.strip():
                    continue
                try:
                    json.loads(line)
                except ValueError as e:
                    cut = not ended
                    return (
                        f"line {n} (record {n - 1}): not valid JSON ({getattr(e, 'msg', e)}, column "
                        f"{getattr(e, 'colno', '?')})"
                        + (
                            ": the file's last line is cut (no newline at its end): "
                            "a truncated download or copy? Restore the file, or "
                            "delete that line"
                            if cut
                            else ""
                        )
                    )
    except (EOFError, OSError) as e:
        if module:
            return (
                f"the {p.suffix} stream ends early ({type(e).__name__}: {e}): the file is truncated (an "
                "interrupted download or copy?); restore it"
            )
        return None
    except UnicodeDecodeError:
        return None
    return None
