"""Reading the JSON-lines files a run is still writing (metrics.jsonl, ranks/rankN.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path


def read_records(path: Path) -> list[dict]:
    """Every complete record in `path` ([] if it does not exist yet); a half-written last line is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written right now
    return out
