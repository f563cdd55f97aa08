"""Helpers shared by test modules of several folders (folder-specific ones live next to their tests:
tests/unit/attention_inputs.py, cli_cases.py, lsh_reference.py; tests/distributed/train_launcher.py, ckpt_runs.py;
tests/cluster/slurm_cluster.py, jsonl_records.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"


def load_tool(name: str) -> ModuleType:
    """A fresh copy of a tools/ script as a module (they are files, not a package).

    Registered in sys.modules under ``tools_<name>``: dataclasses and pickling look a class's module up there.
    """
    key = f"tools_{name}"
    spec = importlib.util.spec_from_file_location(key, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[key]
        raise
    return module
