"""Helpers of the bad-input sweep tests: run a console script in-process, fingerprint a folder."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable


def run_cli(main: Callable[[list[str]], int], capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``main(argv)``; argparse's SystemExit counts as the exit code."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under folder (what "untouched" is compared with)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
