"""SLURM's compressed lists: node lists (``node[01-03,07],gpu5``) and tasks per node (``2(x3),1``).

Used by rank discovery (``parallel/env.py``: the master is the first host of the step's node list) and by
``reformer-launch hostfile``. Errors name where the list came from.
"""

from __future__ import annotations

import math
import re

# SLURM itself allocates at most 65533 nodes (MaxNodeCount); a longer list is a typo (node[01-1000000]).
MAX_HOSTS = 65536


def _split_top_level(text: str, what: str) -> list[str]:
    """Split on commas that are not inside ``[...]``."""
    parts: list[str] = []
    depth = 0
    start = 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"{what}: nested '[' in {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"{what}: unmatched ']' in {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"{what}: unmatched '[' in {text!r}")
    parts.append(text[start:])
    return parts


def _count_range_list(body: str, nodelist: str, what: str) -> int:
    """How many names one bracket group expands to, without expanding it (validated as `_expand_range_list`)."""
    n = 0
    for item in body.split(","):
        lo, sep, hi = item.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"{what}: bad range {item.strip()!r} in {nodelist!r}")
        n += int(hi) - int(lo) + 1 if sep else 1
    return n


def _expand_range_list(body: str, nodelist: str, what: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Expand the inside of one bracket group, e.g. ``"01-03,07"`` -> ``["01","02","03","07"]``."""
    out: list[str] = []
    for item in body.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"{what}: empty range in {nodelist!r}")
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"{what}: bad range {item!r} in {nodelist!r}")
        if not sep:
            out.append(lo)
            continue
        a, b = int(lo), int(hi)
        if b < a:
            raise ValueError(f"{what}: descending range {item!r} in {nodelist!r}")
        # Slurm pads to the width of the lower bound when it has a leading zero ("08-10").
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        out.extend(str(n).zfill(width) for n in range(a, b + 1))
    return out


_GROUP = re.compile(r"\[([^\[\]]*)\]")


def expand_nodelist(nodelist: str, what: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Expand a SLURM hostlist such as ``"node[01-03,07],gpu5,rack[1-2]-n[3-4]"``.

    Zero padding is kept, several comma-separated names and several bracket groups per name are
    supported (the first group varies slowest, like ``scontrol show hostnames``). Duplicates are
    kept in order. Raises ``ValueError`` on malformed input, naming ``what`` (where the list came from), and
    before expanding anything when the list holds more than ``MAX_HOSTS`` names.
    """
    text = nodelist.strip()
    if not text:
        return []
    names = _split_top_level(text, what)
    total = 0
    for name in names:
        groups = _GROUP.findall(name)
        total += math.prod(max(_count_range_list(g, nodelist, what), 0) for g in groups if g.strip())
        if total > MAX_HOSTS:
            raise ValueError(
                f"{what}: {nodelist[:80]!r} names more than {MAX_HOSTS} hosts (SLURM allocates at "
                f"most 65533 nodes): a typo in a range?"
            )
    hosts: list[str] = []
    for name in names:
        name = name.strip()
        if not name:
            raise ValueError(f"{what}: empty host name in {nodelist!r}")
        pieces = _GROUP.split(name)  # literal, group, literal, group, ..., literal
        expanded = [""]
        for i, piece in enumerate(pieces):
            choices = _expand_range_list(piece, nodelist, what) if i % 2 else [piece]
            expanded = [prefix + c for prefix in expanded for c in choices]
        hosts.extend(expanded)
    return hosts


def parse_tasks_per_node(spec: str, name: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """Expand SLURM's compressed tasks-per-node list: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    out: list[int] = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise ValueError(f"{name}: cannot parse {spec!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out
