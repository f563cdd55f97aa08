#!/usr/bin/env python3
"""Compile every Triton kernel the model launches on CUDA for H100/H200 (sm_90) and A100 (sm_80), on a CPU.

No GPU and no libcuda are needed: Triton compiles TTIR -> PTX -> cubin with the ptxas in its wheel. The
launches are the model's own: ``kernels/triton_lsh.py``'s host code runs on meta tensors of each case's real
shapes (no memory) while Triton's driver is a stand-in that names the target and its launcher compiles
without launching. So the specialisation (integer arguments equal to 1 or divisible by 16, i32 vs i64,
pointer alignment), the constexpr flags, num_warps and num_stages are exactly those of a CUDA launch.

Cases: every shipped config (``configs/*.toml``: their layer kinds, chunk lengths, head sizes, masks and
sequence-parallel layout), the bench config of ``benchmarks/``, ``tests/gpu``'s shapes, each in bf16, fp16
and fp32, with and without padding, plus the tile extremes (chunk 256 with head size 128 and every
optional mask on). Identical specialisations are compiled once.

It fails (exit 1) when a kernel
  - needs more shared memory per block than the target has (232448 B sm_90, 166912 B sm_80),
  - uses more than 255 registers, or fails to compile (a call ``unsupported`` accepts would fail to launch),
  - spills in a bf16 case of a shipped config or the bench config on sm_90,
  - takes more than 60 s to compile,
  - is compiled more than once per case (a runtime argument such as the head index specialised by value),
  - does 32-bit arithmetic on a program id or a loaded position (an offset that can wrap past 2^31).
It prints a table (regs, spills, shared bytes, compile seconds per case x arch x kernel) and writes JSON.

  python tools/triton_compile_check.py                       # this environment's Triton, sm_90 + sm_80
  python tools/triton_compile_check.py --triton .venv/triton-3.6.0 --triton .venv/triton-3.7.1
  python tools/triton_compile_check.py --cases bench --arch 90 --json out.json

``--triton DIR`` adds a Triton installed with ``pip install --target DIR triton==X`` (run in a subprocess
with DIR first on the path). Results are cached by (kernel code hash, Triton version, arch, case, tiles) in
``--cache`` (default ``benchmarks/compile_table/``, committed): an unchanged kernel is not compiled again.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMITS = {90: 232448, 80: 166912}  # shared memory per block (bytes)
MAX_REGS = 255
MAX_COMPILE_S = 60.0
KERNELS = ("_fwd", "_bwd_dq", "_bwd_dkdv")


@dataclass(frozen=True)
class Case:
    """One core call the model makes: shapes, dtype and masks (the kernels' constexpr flags follow)."""

    name: str
    batch: int
    length: int
    heads: int
    d_head: int
    chunk_len: int
    rounds: int  # 0 = identity (local attention, one chunk)
    n_chunks_before: int
    n_chunks_after: int
    causal: bool
    dtype: str  # "bfloat16" | "float16" | "float32"
    shared_qk: bool = True
    valid: bool = False
    doc: bool = False
    bucket: bool = False
    allow_duplicate_attention: bool = True  # False: the duplicate-attention correction (its chunk_of input)
    piece: bool = False  # a bucket-sharded rank's piece (positions, chunk_of)
    strict: bool = False  # a shipped/bench config in bf16: spills fail the check on sm_90

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class Result:
    label: str
    arch: int
    kernel: str
    triton: str
    regs: int = -1
    spills: int = -1
    shared: int = -1
    seconds: float = 0.0
    compiles: int = 0
    tiles: str = ""
    error: str = ""
    problems: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- cases


def _config_cases(
    name: str, cfg, seq_len: int, precision: str, documents: bool, ulysses: int, buckets: int
) -> list[Case]:
    """The core calls of one model config (a ReformerConfig) on one rank: its LSH and local layers, in its own
    precision, bf16, fp16 and fp32, with and without padding. Ulysses ranks hold n_heads / ``ulysses`` heads of
    the whole length; bucket-sharded ranks 1 / ``buckets`` of the sorted order (positions and chunk_of given)."""
    own = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(precision, "float32")
    heads, length = cfg.n_heads // ulysses, seq_len // buckets
    kinds = set(cfg.attn_layers)
    cases = []
    # the config's own precision and bf16 with and without padding; fp32 without (fp16 compiles as bf16 does:
    # it is checked on the bench config and the tile extremes)
    for dtype, valid in dict.fromkeys(
        [(own, False), (own, True), ("bfloat16", False), ("bfloat16", True), ("float32", False)]
    ):
        strict = dtype == "bfloat16"
        if "lsh" in kinds and seq_len > cfg.chunk_len:
            cases.append(
                Case(
                    f"{name} lsh",
                    1,
                    length,
                    heads,
                    cfg.d_head,
                    cfg.chunk_len,
                    cfg.n_hashes,
                    cfg.n_chunks_before,
                    cfg.n_chunks_after,
                    cfg.causal,
                    dtype,
                    True,
                    valid,
                    documents,
                    cfg.same_bucket_only,
                    cfg.allow_duplicate_attention,
                    buckets > 1,
                    strict,
                )
            )
        if "local" in kinds:
            cases.append(
                Case(
                    f"{name} local",
                    1,
                    length,
                    heads,
                    cfg.d_head,
                    cfg.local_chunk_len or cfg.chunk_len,
                    0,
                    cfg.local_n_chunks_before,
                    cfg.local_n_chunks_after,
                    cfg.causal,
                    dtype,
                    False,
                    valid,
                    documents,
                    strict=strict,
                )
            )
    return cases


def shipped_cases() -> list[Case]:
    """Every ``configs/*.toml`` as the trainer builds it."""
    from reformer_dist.training.config import load_run_config

    cases = []
    for path in sorted((ROOT / "configs").glob("*.toml")):
        run = load_run_config(path)
        par = run.parallel
        u = par.heads_group_size
        cases += _config_cases(
            path.stem,
            run.model,
            run.data.seq_len,
            run.deepspeed.precision,
            bool(run.data.document_masking),
            u,
            par.sequence_parallel_size // u,
        )
    return cases


def bench_cases() -> list[Case]:
    """The bench config of shared/design/targets.md at 1M tokens (benchmarks/train_step.py's ``ours``)."""
    from reformer_dist.model.config import ReformerConfig

    cfg = ReformerConfig(
        vocab_size=256,
        d_model=512,
        n_heads=8,
        d_head=64,
        d_ff=2048,
        n_layers=6,
        attn_layers=["lsh"] * 6,
        n_hashes=2,
        chunk_len=64,
        axial_pos_shape=[1024, 1024],
    )
    fp16 = Case("bench lsh", 1, 1 << 20, 8, 64, 64, 2, 1, 0, True, "float16")
    return _config_cases("bench", cfg, 1 << 20, "bf16", False, 1, 1) + [fp16]


def gpu_test_cases() -> list[Case]:
    """tests/gpu/test_cuda_attention.py's core cases, fp32 and bf16."""
    cases = []
    # L, H, D, M, R, n_chunks_before, n_chunks_after, causal, shared_qk, padded, bucket, duplicate correction
    rows = [
        (1024, 4, 64, 64, 2, 1, 0, True, True, True, False, False),
        (2048, 2, 64, 64, 4, 1, 0, True, True, False, False, True),
        (1024, 4, 64, 64, 2, 1, 1, False, True, True, True, False),
        (1536, 2, 64, 32, 3, 2, 0, True, True, False, False, False),
        (1024, 4, 64, 128, 0, 1, 0, True, False, False, False, False),
        (1024, 4, 64, 256, 2, 1, 0, True, True, True, False, False),
        (2048, 2, 128, 256, 0, 1, 1, False, False, False, False, False),
        (2048, 2, 128, 128, 4, 1, 0, True, True, False, False, True),
    ]
    for dtype in ("float32", "bfloat16"):
        for length, h, d, m, r, nb, na, causal, shared, valid, bucket, correct in rows:
            cases.append(
                Case(
                    f"tests/gpu L{length} M{m} D{d}",
                    1,
                    length,
                    h,
                    d,
                    m,
                    r,
                    nb,
                    na,
                    causal,
                    dtype,
                    shared,
                    valid,
                    bucket=bucket,
                    allow_duplicate_attention=not correct,
                )
            )
    return cases


def extreme_cases() -> list[Case]:
    """The largest tiles ``unsupported`` accepts, every optional mask on; an odd one-chunk length; int64 offsets."""
    cases = []
    for dtype in ("bfloat16", "float16", "float32"):
        cases.append(
            Case(
                "extreme chunk256 d128 all masks",
                2,
                4096,
                2,
                128,
                256,
                4,
                2,
                1,
                True,
                dtype,
                True,
                True,
                doc=True,
                bucket=True,
                allow_duplicate_attention=False,
                piece=True,
            )
        )
        cases.append(
            Case("extreme local chunk256 d128", 2, 4096, 2, 128, 256, 0, 1, 1, False, dtype, False, True, True)
        )
        cases.append(Case("one chunk of 37", 1, 37, 2, 64, 37, 0, 0, 0, True, dtype, True, True))
    cases.append(Case("batch 5 x 1M x 8 heads (offsets > 2^31)", 5, 1 << 20, 8, 64, 64, 2, 1, 0, True, "bfloat16"))
    return cases


def shipped_bf16_cases() -> list[Case]:
    """The shipped configs in bf16 only (the cases whose spills fail the check)."""
    return [c for c in shipped_cases() if c.dtype == "bfloat16"]


CASE_SETS = {
    "shipped": shipped_cases,
    "shipped-bf16": shipped_bf16_cases,
    "bench": bench_cases,
    "gpu-tests": gpu_test_cases,
    "extreme": extreme_cases,
}


def collect(names: list[str]) -> list[Case]:
    seen, out = set(), []
    for n in names:
        for c in CASE_SETS[n]():
            if c.key() not in seen:
                seen.add(c.key())
                out.append(c)
    return out


# ---------------------------------------------------------------------------------------------- worker


class _StandInDriver:
    """What Triton's launcher asks of a driver to compile (never to launch): a device, a stream, the target."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.target.arch  # one kernel cache per arch

    def get_current_stream(self, device=None):
        return 0

    def set_current_device(self, device):
        pass

    def get_device_interface(self):
        import torch

        return torch.cuda

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _meta_inputs(c: Case):
    """Meta tensors of the case's shapes (no memory) and the core's keyword arguments."""
    import torch

    dt = getattr(torch, c.dtype)
    meta = dict(device="meta")
    shape = (c.batch, c.length, c.heads, c.d_head)
    q = torch.empty(shape, dtype=dt, **meta)
    k = None if c.shared_qk else torch.empty(shape, dtype=dt, **meta)
    v = torch.empty(shape, dtype=dt, **meta)
    s = c.length * max(1, c.rounds)
    index = torch.empty(c.batch, c.heads, s, dtype=torch.int32, **meta) if c.rounds else None
    kw = dict(
        chunk_len=c.chunk_len,
        n_chunks_before=c.n_chunks_before,
        n_chunks_after=c.n_chunks_after,
        causal=c.causal,
        self_mask=True,
        allow_duplicate_attention=c.allow_duplicate_attention,
    )
    if c.valid:
        kw["key_valid"] = torch.empty(c.batch, c.length, dtype=torch.bool, **meta)
    if c.doc:
        kw["document_ids"] = torch.empty(c.batch, c.length, dtype=torch.int32, **meta)
    if c.bucket:
        kw["slot_bucket"] = torch.empty(c.batch, c.heads, s, dtype=torch.int32, **meta)
    if c.piece:
        kw["positions"] = torch.empty(c.batch, c.heads, s, dtype=torch.int32, **meta)
        kw["chunk_of"] = torch.empty(c.batch, c.heads, max(1, c.rounds), c.length, dtype=torch.int32, **meta)
        kw["n_chunks"] = 4 * s // c.chunk_len
    return q, k, v, index, kw


def _ir_problems(ttir: str) -> list[str]:
    """32-bit arithmetic on a program id or a loaded int32 (a position): each must be widened to i64 first, so
    that no product of it with a stride or size can wrap at 2^31 (TTIR, before any lowering)."""
    defs = {}
    for line in ttir.splitlines():
        line = re.sub(r"\s+loc\(.*\)\s*$", "", line)
        m = re.match(r"\s*(%[\w#]+) = ([\w.]+)(.*)", line)
        if m:
            defs[m.group(1)] = (m.group(2), m.group(3).strip())
    risky = {
        name: op
        for name, (op, rest) in defs.items()
        if op == "tt.get_program_id" or (op == "tt.load" and "!tt.ptr<i32>" in rest)
    }
    problems = []
    for name, (op, rest) in defs.items():
        if op in ("arith.muli", "arith.addi", "arith.subi") and re.search(r":\s*(tensor<[\dx]+x)?i32>?$", rest):
            hit = [o for o in re.findall(r"%[\w#]+", rest) if o in risky]
            if hit:
                problems.append(f"32-bit {op} on {hit[0]} ({risky[hit[0]]}): widen it to int64 first")
    return problems


def work(cases: list[Case], archs: list[int], ir: bool, tiles: tuple[int, ...] | None = None) -> list[Result]:
    """Compile the cases in this process's Triton; one Result per (case, arch, kernel).

    Triton's own in-memory kernel cache is kept across cases, so a specialisation two cases share is compiled
    once (and reported for both). ``tiles`` = (bq, bk, num_warps, num_stages) overrides ``tiles_for``."""
    import torch
    import triton
    import triton.compiler as compiler_pkg
    from triton.backends.compiler import GPUTarget
    from triton.runtime import jit as jit_mod
    from triton.runtime.driver import driver

    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, set: it warns otherwise
    os.environ.pop("TRITON_INTERPRET", None)
    from reformer_dist.kernels import triton_lsh as tl_mod
    from reformer_dist.kernels.lean_function import CoreInputs

    if tiles is not None:
        bq, bk, warps, stages = tiles
        tl_mod.tiles_for = lambda m, d, dt: tl_mod.Tiles(bq, bk, max(16, triton.next_power_of_2(d)), warps, stages)
    results: list[Result] = []
    used: dict[str, set[int]] = {}  # kernel name -> ids of the compiled kernels this case launched
    metrics: dict[int, dict] = {}  # id(compiled kernel) -> what its compile cost
    orig_run, orig_compile = jit_mod.JITFunction.run, compiler_pkg.compile

    def run(self, *args, grid, warmup, **kwargs):  # compile, never launch
        kernel = orig_run(self, *args, grid=grid, warmup=True, **kwargs)
        used[self.fn.__name__].add(id(kernel))
        return kernel

    def compile_and_measure(src, target=None, options=None, **kw):
        buf = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(buf):
            kernel = orig_compile(src, target=target, options=options, **kw)
        log = buf.getvalue()
        metrics[id(kernel)] = dict(
            seconds=time.perf_counter() - t0,
            shared=int(kernel.metadata.shared),
            regs=max([int(x) for x in _PTXAS.findall(log)] or [-1]),
            spills=max([int(a) + int(b) for a, b in _SPILL.findall(log)] or [-1]),
            problems=_ir_problems(kernel.asm["ttir"]) if ir and "ttir" in kernel.asm else [],
        )
        return kernel

    jit_mod.JITFunction.run = run
    compiler_pkg.compile = compile_and_measure  # the launcher imports it from here when it builds its cache
    try:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["TRITON_CACHE_DIR"] = cache  # compile for real, never from an earlier run's cache
            for arch in archs:
                driver.set_active(_StandInDriver(GPUTarget("cuda", arch, 32)))
                for c in cases:
                    for kern in KERNELS:
                        used[kern] = set()
                    error, t = "", None
                    try:
                        q, k, v, index, kw = _meta_inputs(c)
                        x = CoreInputs(
                            q,
                            k,
                            v,
                            index,
                            kw.get("key_valid"),
                            kw.get("slot_bucket"),
                            kw.get("document_ids"),
                            kw.get("positions"),
                            kw.get("chunk_of"),
                        )
                        call = tl_mod._Call(
                            x,
                            chunk_len=c.chunk_len,
                            n_chunks_before=c.n_chunks_before,
                            n_chunks_after=c.n_chunks_after,
                            causal=c.causal,
                            self_mask=True,
                            allow_duplicate_attention=c.allow_duplicate_attention,
                            n_chunks=kw.get("n_chunks"),
                        )
                        t = call.tiles
                        out, lse, lo = tl_mod._forward(call, q, k, v)
                        tl_mod._backward(call, q, k, v, out, lse, lo, torch.empty_like(out), None)
                    except Exception as e:  # noqa: BLE001  (reported: the check fails on it)
                        error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
                    for kern in KERNELS:
                        ms = [metrics[i] for i in used[kern] if i in metrics]
                        r = Result(
                            f"{c.name} {c.dtype}",
                            arch,
                            kern,
                            triton.__version__,
                            compiles=len(used[kern]),
                            error=error if not ms else "",
                            tiles="" if t is None else tile_label(t),
                        )
                        if ms:
                            r.regs = max(m["regs"] for m in ms)
                            r.spills = max(m["spills"] for m in ms)
                            r.shared = max(m["shared"] for m in ms)
                            r.seconds = max(m["seconds"] for m in ms)
                            r.problems = sorted({p for m in ms for p in m["problems"]})
                        results.append(r)
                        print(json.dumps({"case": c.key(), **asdict(r)}), flush=True)
    finally:
        jit_mod.JITFunction.run = orig_run
        compiler_pkg.compile = orig_compile
    return results


# ---------------------------------------------------------------------------------------------- parent

CHECK_VERSION = "1"  # bump when what a worker measures changes: cached results are then compiled again


def source_hash() -> str:
    """Hash of what decides the compiled code (the kernel module, less the tile rule, and the values of the
    constants it imports from logits.py) and of how it is measured (``CHECK_VERSION``); the case (shapes,
    dtype, flags) and the tiles it gets are each cached record's key. The rest of logits.py is host code of
    the other cores: changing it compiles nothing again."""
    h = hashlib.sha256(CHECK_VERSION.encode())
    tree = ast.parse((ROOT / "reformer_dist/kernels/triton_lsh.py").read_text())
    # the tile rule is not hashed: each record carries the tiles it was compiled with and is reused only for them
    tree.body = [n for n in tree.body if not (isinstance(n, ast.FunctionDef) and n.name == "tiles_for")]
    for node in ast.walk(tree):  # docstrings and comments do not change the code
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(getattr(body[0], "value", None), ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    h.update(ast.unparse(tree).encode())  # the code alone: formatting, comments and docstrings do not count
    from reformer_dist.kernels import logits

    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "reformer_dist.kernels.logits":
            for alias in node.names:
                value = getattr(logits, alias.name)
                if isinstance(value, (int, float)):
                    h.update(f"{alias.name}={value!r}".encode())
    return h.hexdigest()[:16]


def problems_of(r: dict, case: dict) -> list[str]:
    """Why a result fails the check (empty when it passes)."""
    out = []
    if r["error"]:
        out.append(f"compile failed: {r['error']}")
        return out
    if r["shared"] > LIMITS[r["arch"]]:
        out.append(f"shared memory {r['shared']} B > {LIMITS[r['arch']]} B of sm_{r['arch']}")
    if r["regs"] > MAX_REGS:
        out.append(f"{r['regs']} registers > {MAX_REGS}")
    if case.get("strict") and r["arch"] == 90 and r["spills"] > 0:
        out.append(f"spills {r['spills']} B in bf16 on sm_90 (a shipped or bench config)")
    if r["seconds"] > MAX_COMPILE_S:
        out.append(f"compile took {r['seconds']:.0f} s > {MAX_COMPILE_S:.0f} s")
    if r["compiles"] != 1:
        out.append(
            f"{r['compiles']} different compiled kernels in one case (a runtime argument such as the head "
            "index is specialised by value)"
        )
    out += r.get("problems", [])
    return out


def run_env(
    triton_dir: str | None, cases: list[Case], archs: list[int], cache: Path | None, tiles: str | None
) -> list[dict]:
    """Results of every case under one Triton (a side folder or this environment's), from the cache where the
    kernel code (``source_hash``), the Triton version and the case's tiles are unchanged. One worker per arch."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(d).resolve()) for d in [triton_dir] if d] + [str(ROOT)] + [env.get("PYTHONPATH", "")]
    )
    version = subprocess.run(
        [sys.executable, "-c", "import triton; print(triton.__version__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    cache_file = None if cache is None or tiles else cache / f"{source_hash()}-triton{version}.jsonl"
    want = {c.key(): expected_tiles(c, tiles) for c in cases}
    done: dict[tuple, dict] = {}
    if cache_file is not None and cache_file.is_file():
        for line in cache_file.read_text().splitlines():
            rec = json.loads(line)
            if rec["case"] not in want or rec["tiles"] == want[rec["case"]]:  # compiled with today's tiles
                done[(rec["case"], rec["arch"], rec["kernel"])] = rec
    if cache_file is not None:
        cache.mkdir(parents=True, exist_ok=True)
        for stale in cache.glob(f"*-triton{version}.jsonl"):  # results of an older kernel source
            if stale != cache_file:
                stale.unlink()
    procs = []
    for arch in archs:
        todo = [c for c in cases if any((c.key(), arch, k) not in done for k in KERNELS)]
        if not todo:
            continue
        cmd = [sys.executable, __file__, "--worker", "--arch", str(arch)] + (["--tiles", tiles] if tiles else [])
        p = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        p.stdin.write(json.dumps([asdict(c) for c in todo]))
        p.stdin.close()
        procs.append(p)
    for p in procs:
        for line in p.stdout:
            if line.startswith("{"):
                rec = json.loads(line)
                done[(rec["case"], rec["arch"], rec["kernel"])] = rec
                if cache_file is not None:  # kept as it comes: an interrupted run loses nothing compiled
                    with open(cache_file, "a") as f:
                        f.write(json.dumps(rec) + "\n")
        if p.wait() != 0:
            raise SystemExit(f"triton_compile_check: the worker for Triton {version} failed (exit {p.returncode})")
    known = {c.key() for c in collect(list(CASE_SETS))}  # records of cases no set makes any more are dropped
    dropped = [k for k in done if k[0] not in known]
    for k in dropped:
        del done[k]
    if (procs or dropped) and cache_file is not None:  # one record per (case, arch, kernel), sorted: a readable diff
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(done[k]) + "\n" for k in sorted(done)))
        tmp.replace(cache_file)
    return [done[(c.key(), a, k)] for c in cases for a in archs for k in KERNELS]


def expected_tiles(c: Case, override: str | None) -> str:
    """The tiles a case compiles with (``tiles_for``, or the --tiles override), as the worker records them."""
    import torch

    from reformer_dist.kernels.triton_lsh import Tiles, tiles_for

    t = tiles_for(c.chunk_len, c.d_head, getattr(torch, c.dtype))
    if override:
        bq, bk, w, st = (int(x) for x in override.split(","))
        t = Tiles(bq, bk, t.block_d, w, st)
    return tile_label(t)


def tile_label(t) -> str:
    """How a result records its tiles (q x k x D, warps, stages): the cache key's tile part."""
    return f"{t.bq}x{t.bk}x{t.block_d} w{t.num_warps} s{t.num_stages}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--arch", default="90,80", help="compute capabilities to compile for (default 90,80)")
    ap.add_argument(
        "--cases", default="shipped,bench,gpu-tests,extreme", help=f"comma-separated case sets: {', '.join(CASE_SETS)}"
    )
    ap.add_argument("--only", metavar="TEXT", help="only the cases whose name + dtype contains TEXT")
    ap.add_argument(
        "--triton",
        action="append",
        default=[],
        metavar="DIR",
        help="also check with the Triton installed in DIR (pip install --target DIR triton==X)",
    )
    ap.add_argument(
        "--triton-cases",
        default="shipped-bf16,bench,extreme",
        help="case sets for the --triton versions (default: every config in bf16, the bench config in "
        "every dtype, the tile extremes)",
    )
    ap.add_argument("--no-local", action="store_true", help="skip this environment's own Triton")
    ap.add_argument("--json", type=Path, help="write every result here")
    ap.add_argument(
        "--cache",
        type=Path,
        default=ROOT / "benchmarks" / "compile_table",
        help="results by (kernel source hash, Triton version); committed, so CI compiles only what changed",
    )
    ap.add_argument("--no-cache", action="store_true", help="compile everything, read and write no cache")
    ap.add_argument(
        "--tiles",
        help="bq,bk,num_warps,num_stages: compile with these tiles instead of tiles_for's "
        "(to try a tile set; never cached)",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",")]
    if args.worker:
        cases = [Case(**c) for c in json.loads(sys.stdin.read())]
        work(cases, archs, True, tuple(int(x) for x in args.tiles.split(",")) if args.tiles else None)
        return 0
    bad = [a for a in archs if a not in LIMITS]
    if bad:
        ap.error(f"--arch: {bad} not among {sorted(LIMITS)}")
    names, side_names = args.cases.split(","), args.triton_cases.split(",")
    for flag, given in (("--cases", names), ("--triton-cases", side_names)):
        unknown = [n for n in given if n not in CASE_SETS]
        if unknown:
            ap.error(f"{flag}: unknown {unknown}; choose from {list(CASE_SETS)}")
    for d in args.triton:
        if not (Path(d) / "triton").is_dir():
            ap.error(f"--triton {d}: no triton package there (install with: pip install --target {d} triton==X)")
    sys.path.insert(0, str(ROOT))

    def pick(sets: list[str]) -> list[Case]:
        return [c for c in collect(sets) if not args.only or args.only in f"{c.name} {c.dtype}"]

    cases, side = pick(names), pick(side_names)
    if not cases:
        ap.error(f"--only {args.only!r}: no case matches")
    by_key = {c.key(): c for c in cases + side}
    rows = []
    t0 = time.perf_counter()
    cache = None if args.no_cache else args.cache
    if not args.no_local:
        rows += run_env(None, cases, archs, cache, args.tiles)
    for d in args.triton:
        rows += run_env(d, side, archs, cache, args.tiles)
    failures = []
    print("| triton | arch | case | kernel | tiles | regs | spills B | shared B | compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        case = asdict(by_key[r["case"]])
        r["failures"] = problems_of(r, case)
        flag = "  FAIL: " + "; ".join(r["failures"]) if r["failures"] else ""
        print(
            f"| {r['triton']} | sm_{r['arch']} | {r['label']}{' pad' if case['valid'] else ''} | {r['kernel']} | "
            f"{r['tiles']} | {r['regs']} | {r['spills']} | {r['shared']} | {r['seconds']:.1f} |{flag}"
        )
        if r["failures"]:
            failures.append(r)
    worst = max((r["seconds"] for r in rows), default=0.0)
    versions = sorted({r["triton"] for r in rows})
    print(
        f"\n{len(rows)} kernel launches checked ({len(archs)} archs x {len(KERNELS)} kernels x cases: "
        + ", ".join(
            f"{sum(r['triton'] == v for r in rows) // (len(archs) * len(KERNELS))} under Triton {v}" for v in versions
        )
        + f") in {time.perf_counter() - t0:.0f} s; slowest compile {worst:.1f} s; {len(failures)} failing"
    )
    if args.json:
        args.json.write_text(json.dumps({"limits": LIMITS, "rows": rows}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
