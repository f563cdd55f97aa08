"""The GPU compile check (tools/triton_compile_check.py) itself: it catches what it claims to catch.

The whole check runs in ``make test`` (README's test command) for sm_90 and sm_80 under three Triton versions;
these tests show it can fail: a tile set over the shared-memory limit, a head index specialised by value and an
offset computed in 32 bits are each reported. They compile for real (ptxas from Triton's wheel, no GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from reformer_dist.kernels import triton_lsh
from tests.helpers import REPO as ROOT, TOOLS, load_tool

TOOL = TOOLS / "triton_compile_check.py"
check = load_tool("triton_compile_check")


def _env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compiled code, not the interpreter
    return env


@pytest.mark.slow
def test_oversized_tile_is_caught(tmp_path):
    # 128 x 128 tiles of a 128-wide head, 3 stages: the backward asks for 197632 B and more, over sm_80's 166912 B
    out = tmp_path / "r.json"
    run = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "--cases",
            "extreme",
            "--only",
            "extreme local chunk256 d128 bfloat16",
            "--arch",
            "80",
            "--tiles",
            "128,128,8,3",
            "--no-cache",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    rows = json.loads(out.read_text())["rows"]
    too_big = [r for r in rows if any("shared memory" in f for f in r["failures"])]
    assert too_big and all(r["shared"] > check.LIMITS[80] for r in too_big)
    assert "FAIL" in run.stdout


def test_problems_of_names_each_limit():
    base = dict(error="", arch=90, shared=1000, regs=128, spills=0, seconds=1.0, compiles=1, problems=[])
    assert check.problems_of(base, {"strict": True}) == []
    assert "shared memory" in check.problems_of({**base, "shared": 232449}, {})[0]
    assert check.problems_of({**base, "arch": 80, "shared": 200000}, {})
    assert "spills" in check.problems_of({**base, "spills": 8}, {"strict": True})[0]
    assert check.problems_of({**base, "spills": 8}, {"strict": False}) == []  # only bf16 shipped configs on sm_90
    assert check.problems_of({**base, "spills": 8, "arch": 80}, {"strict": True}) == []
    assert "compile took" in check.problems_of({**base, "seconds": 61.0}, {})[0]
    assert "specialised" in check.problems_of({**base, "compiles": 3}, {})[0]
    assert "compile failed" in check.problems_of({**base, "error": "OutOfResources"}, {})[0]


IR_PROBE = """
import json, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton_compile_check as check  # tools/ is on PYTHONPATH (the test sets it)

@triton.jit
def wraps(x_ptr, y_ptr, stride):
    b = tl.program_id(1)
    offs = tl.arange(0, 16)
    tl.store(y_ptr + b * stride + offs, tl.load(x_ptr + b * stride + offs))

@triton.jit
def widened(x_ptr, y_ptr, stride):
    b = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, 16)
    tl.store(y_ptr + b * stride + offs, tl.load(x_ptr + b * stride + offs))

@triton.jit
def loaded(x_ptr, i_ptr, y_ptr, stride):
    offs = tl.arange(0, 16)
    pos = tl.load(i_ptr + offs)  # an int32 position read from memory, multiplied in 32 bits
    tl.store(y_ptr + offs, tl.load(x_ptr + pos * stride))

out = {}
for fn in (wraps, widened, loaded):
    sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "stride": "i32"} | ({"i_ptr": "*i32"} if fn is loaded else {})
    ttir = triton.compile(ASTSource(fn, sig, {}), target=GPUTarget("cuda", 90, 32)).asm["ttir"]
    out[fn.__name__] = check._ir_problems(ttir)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_ir_check_flags_32bit_offsets_and_passes_64bit_ones(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(IR_PROBE)
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(TOOLS)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    run = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert any("get_program_id" in p for p in found["wraps"])
    assert any("tt.load" in p for p in found["loaded"])
    assert found["widened"] == []


@pytest.mark.slow
def test_the_model_kernels_pass_the_ir_check_and_compile_once_for_every_head(tmp_path):
    # batch 5 x 1M tokens x 8 heads: flat offsets pass 2^31; every head must reuse one compiled kernel
    out = tmp_path / "r.json"
    run = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "--cases",
            "extreme",
            "--only",
            "batch 5",
            "--arch",
            "90",
            "--no-cache",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {r["kernel"] for r in rows} == set(check.KERNELS)
    for r in rows:
        assert r["compiles"] == 1 and r["problems"] == [] and r["failures"] == [], r


@pytest.mark.parametrize(
    "m,d,dtype",
    [
        (256, 128, torch.bfloat16),
        (256, 128, torch.float32),
        (64, 64, torch.float16),
        (37, 64, torch.bfloat16),
        (8, 8, torch.float32),
    ],
)
def test_tiles_never_span_a_whole_long_chunk(m, d, dtype):
    t = triton_lsh.tiles_for(m, d, dtype)
    assert t.bq <= 64 and t.bk <= 64 and t.block_d >= d
    fit = max(16, triton_lsh.triton.next_power_of_2(m))
    assert t.bq <= fit and t.bk <= fit


def test_unsupported_names_the_reason_and_accepts_what_the_check_verifies():
    q = torch.empty(1, 8, 2, 128, dtype=torch.bfloat16)
    assert triton_lsh.unsupported(q, chunk_len=256) is None
    assert triton_lsh.unsupported(q.float(), chunk_len=1) is None
    assert "chunk length 257" in triton_lsh.unsupported(q, chunk_len=257)
    assert "head size 256" in triton_lsh.unsupported(torch.empty(1, 8, 2, 256, dtype=torch.bfloat16), chunk_len=64)
    assert "dtype torch.float64" in triton_lsh.unsupported(q.double(), chunk_len=64)


def test_every_shipped_config_and_the_bench_config_are_cases():
    cases = check.collect(["shipped", "bench"])
    names = {c.name.split()[0] for c in cases}
    assert {p.stem for p in (ROOT / "configs").glob("*.toml")} <= names and "bench" in names
    assert {c.dtype for c in cases} == {"bfloat16", "float16", "float32"}
    million = [c for c in cases if c.name.startswith("million_1gpu") and c.dtype == "bfloat16"]
    assert million and all(c.chunk_len == 256 and c.strict for c in million)
