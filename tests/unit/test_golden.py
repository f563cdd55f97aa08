"""Today's model computes the function it computed before the memory-lean attention rewrite (float64).

golden/golden.json was written by golden/make_golden.py at commit 3b5df09 (sorted copies, per-round outputs):
losses, logits and random projections of every parameter gradient of small models covering LSH + local +
full layers, 1-4 rounds, duplicate correction, same-bucket masks, non-causal look-ahead, factorised
buckets, internal padding and the ordinary (non-reversible) stack.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from reformer_dist.kernels import blockwise

_HERE = Path(__file__).parent / "golden"
_spec = importlib.util.spec_from_file_location("make_golden", _HERE / "make_golden.py")
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)
GOLDEN = json.loads((_HERE / "golden.json").read_text())


@pytest.mark.parametrize("case", sorted(golden.CASES))
@pytest.mark.parametrize("core", ["auto", "reference", "blockwise_small_blocks"])
def test_model_matches_golden_outputs_and_gradients(case, core, monkeypatch):
    model, ids = golden.build(case)
    if core == "reference":
        model.cfg = dataclasses.replace(model.cfg, attention_backend="reference")
    if core == "blockwise_small_blocks":  # tiny blocks: many blocks per round
        monkeypatch.setattr(blockwise, "_BLOCK_ELEMS", 64)
    got, want = golden.measure(model, ids), GOLDEN[case]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-10)
    assert got["logit_proj"] == pytest.approx(want["logit_proj"], rel=1e-10)
    for row_got, row_want in zip(got["logit_first"], want["logit_first"]):
        assert row_got == pytest.approx(row_want, rel=1e-10)
    assert got["grad_proj"].keys() == want["grad_proj"].keys()
    for name, value in want["grad_proj"].items():
        assert got["grad_proj"][name] == pytest.approx(value, rel=1e-7, abs=1e-9), name
