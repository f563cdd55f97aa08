"""What the library tells the user: one logger tree (``reformer_dist``), printed as ``<prog>: message``.

Library modules log through ``logging.getLogger(__name__)``; a command calls :func:`setup` once with its
name. Lines go to stderr through ``tqdm.write``, so a progress bar (training/metrics.py) is redrawn below
them instead of being broken. Warnings read ``<prog>: warning: ...`` and errors ``<prog>: error: ...``.
In a multi-process run only rank 0 shows information; every rank shows warnings and errors. Without
:func:`setup` (the library used from Python) the host application's logging configuration applies.
"""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm

ROOT = "reformer_dist"
_prog = ROOT  # the name lines start with (`setup`)


def prog_name() -> str:
    """The command's name given to `setup` (for text written outside logging, e.g. from a signal handler)."""
    return _prog


class _Formatter(logging.Formatter):
    def __init__(self, prog: str):
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        kind = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}
        return f"{self.prog}: {kind.get(record.levelno, '')}{record.getMessage()}"


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def setup(prog: str, show_info: bool = True) -> logging.Logger:
    """Print the library's messages as ``prog: ...`` on stderr (info only when ``show_info``: rank 0).
    Idempotent: a second call replaces the handler. Returns the root logger of the library."""
    global _prog
    _prog = prog
    log = logging.getLogger(ROOT)
    for h in [h for h in log.handlers if isinstance(h, _TqdmHandler)]:
        log.removeHandler(h)
    handler = _TqdmHandler()
    handler.setFormatter(_Formatter(prog))
    log.addHandler(handler)
    log.setLevel(logging.INFO if show_info else logging.WARNING)
    return log
