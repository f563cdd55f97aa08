"""Argument types the console scripts share: each bound stated once, each error naming what was expected."""

from __future__ import annotations

import argparse
from typing import Callable

from reformer_dist.parallel.env import MAX_THREADS_PER_CORE, usable_cores


def int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``lo``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = lo - 1
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}")
        return v

    return parse


def worker_count(text: str) -> int:
    """Processes or threads of a tool: 1 .. MAX_THREADS_PER_CORE x the usable cores (more only wait, and each costs
    memory)."""
    cores = usable_cores()
    most = MAX_THREADS_PER_CORE * cores
    try:
        v = int(text)
    except ValueError:
        v = 0
    if not 1 <= v <= most:
        raise argparse.ArgumentTypeError(
            f"expected an integer in 1..{most} ({MAX_THREADS_PER_CORE} x the {cores} "
            f"cores this process may use), got {text!r}"
        )
    return v
