"""The exit codes of every `reformer-*` command (one table: scripts and SLURM wrappers test them)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What a `reformer-*` process returns."""

    OK = 0  # finished, or preempted with its checkpoint saved
    FAILED = 1  # the work itself failed (e.g. a conversion or a generation that could not complete)
    USAGE = 2  # bad config, data, checkpoint or arguments: named before any work
    NONFINITE = 3  # reformer-train stopped after too many non-finite losses in a row
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, what shells report); reformer-train saved a checkpoint first
