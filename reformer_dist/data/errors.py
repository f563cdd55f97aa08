"""The one exception type of the data pipeline."""

from __future__ import annotations


class DataError(ValueError):
    """Bad or inconsistent input data. The message names the offending file (or store) and says why."""
