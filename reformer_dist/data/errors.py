"""The exception types of the data pipeline."""

from __future__ import annotations


class DataError(ValueError):
    """Bad or inconsistent input data. The message names the offending file (or store) and says why."""


class UsageError(DataError):
    """Options that contradict each other (e.g. an output folder inside the input); `reformer-data` exits 2."""
