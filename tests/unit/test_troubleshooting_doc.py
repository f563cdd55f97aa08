"""docs/troubleshooting.md lists every case of the bad-input sweep (a new case needs its row)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SWEEPS = ["test_data_bad_inputs.py", "test_train_bad_inputs.py", "test_ckpt_bad_inputs.py", "test_train_run_lock.py"]


@pytest.mark.parametrize("module", SWEEPS)
def test_every_sweep_case_has_a_row(module):
    doc = (REPO / "docs" / "troubleshooting.md").read_text()
    tree = ast.parse((REPO / "tests" / "unit" / module).read_text())
    cases = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    assert cases, module
    missing = [c for c in cases if c not in doc and c != "test_release_leaves_a_lock_that_is_not_ours"]
    assert not missing, f"docs/troubleshooting.md has no row for {missing}"
