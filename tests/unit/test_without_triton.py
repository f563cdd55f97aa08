"""triton is optional: without it the package imports, lists the PyTorch cores and trains."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # trains in a Python subprocess

CODE = """
import sys
sys.modules["triton"] = None  # any `import triton` now raises ImportError
import torch
from reformer_dist import ReformerConfig, ReformerLM
from reformer_dist.kernels.chunked_attention import available_backends
assert available_backends() == ["reference", "blockwise"], available_backends()
m = ReformerLM(ReformerConfig(vocab_size=16, d_model=16, n_heads=2, d_head=8, d_ff=16, chunk_len=8,
                              axial_pos_shape=[8, 8]))
opt = torch.optim.SGD(m.parameters(), lr=0.1)
ids = torch.randint(0, 16, (1, 40))
first = m.loss(ids)
for _ in range(5):
    opt.zero_grad()
    loss = m.loss(ids)
    loss.backward()
    opt.step()
assert loss.item() < first.item(), (first.item(), loss.item())
print("ok")
"""


def test_package_trains_without_triton():
    p = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]
