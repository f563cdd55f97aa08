"""The standalone scripts of tools/: what they share with the package, and the corpus scripts on tiny
synthetic downloads (no network)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from reformer_dist import ondisk

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def load_tool(name: str) -> ModuleType:
    """A tools/ script as a module (they are files, not a package)."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_zero_to_safetensors_reads_and_writes_the_packages_file_names():
    # the script cannot import reformer_dist.ondisk, so it spells the names itself: they must not drift
    tool = load_tool("zero_to_safetensors")
    assert (tool.LATEST, tool.RUN_CONFIG, tool.CONFIG_NAME, tool.WEIGHTS_NAME) == (
        ondisk.LATEST, ondisk.RUN_CONFIG, ondisk.CONFIG_NAME, ondisk.WEIGHTS_NAME)
    assert TOOLS / ondisk.ZERO_TO_SAFETENSORS == Path(tool.__file__)
