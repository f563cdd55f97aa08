"""Attention-core forward + backward: the Triton kernel vs the blockwise PyTorch core vs dense SDPA (flash).

LSH shape of the bench config (8 heads x 64, 2 hash rounds, chunk 64, one chunk before, causal, shared QK)
over random permutations; the dense baseline is causal SDPA over the same tokens (FlashAttention on CUDA).
Times with CUDA events after a warm-up; fresh random inputs (never zeros). Prints a table and writes JSON.

    python benchmarks/attention_core.py --lengths 16384,65536,262144,1048576 --json core.json   # GPU
    python benchmarks/attention_core.py --dry-run                                              # CPU, tiny
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from reformer_dist.kernels.chunked_attention import available_backends, chunked_attention
from train_step import is_oom  # sibling script: `python benchmarks/attention_core.py` puts benchmarks/ on sys.path

H, D, R, M = 8, 64, 2, 64


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run_lsh(backend: str, length: int, device: str, dtype: torch.dtype, repeats: int) -> dict:
    g = torch.Generator(device=device).manual_seed(length)
    qk = torch.randn(1, length, H, D, device=device, dtype=dtype, generator=g, requires_grad=True)
    v = torch.randn(1, length, H, D, device=device, dtype=dtype, generator=g, requires_grad=True)
    index = torch.argsort(torch.rand(1, H, R, length, device=device, generator=g), dim=-1).view(1, H, R * length)
    index = index.to(torch.int32)
    grad = torch.randn(1, length, H, D, device=device, dtype=dtype, generator=g)

    def step():
        out, _ = chunked_attention(
            qk, None, v, index, chunk_len=M, n_chunks_before=1, n_chunks_after=0, causal=True, backend=backend
        )
        torch.autograd.backward(out, grad)

    return _measure(step, length, device, repeats)


def run_dense(length: int, device: str, dtype: torch.dtype, repeats: int) -> dict:
    g = torch.Generator(device=device).manual_seed(length)
    q, k, v = (
        torch.randn(1, H, length, D, device=device, dtype=dtype, generator=g, requires_grad=True) for _ in range(3)
    )
    grad = torch.randn(1, H, length, D, device=device, dtype=dtype, generator=g)

    def step():
        torch.autograd.backward(F.scaled_dot_product_attention(q, k, v, is_causal=True), grad)

    return _measure(step, length, device, repeats)


def _measure(step, length: int, device: str, repeats: int) -> dict:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sec = timed(step, device, repeats)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"ms": sec * 1e3, "tok_s": length / sec, "peak_gib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="16384,65536,262144,1048576")
    ap.add_argument("--systems", default="triton,blockwise,dense-sdpa")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny lengths: check the script end to end")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu":  # the Triton kernel runs on CPU only through Triton's interpreter (before triton loads)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lengths = [128] if args.dry_run else [int(x) for x in args.lengths.split(",")]
    if args.dry_run:  # Triton's interpreter runs every program in Python: one timed call is plenty
        args.repeats = 1
    systems = args.systems.split(",")
    if "triton" in systems and "triton" not in available_backends():
        print("triton: not importable; skipped")
        systems.remove("triton")
    rows, dead = [], set()
    print(f"device={device} dtype={dtype} torch={torch.__version__}")
    for length in lengths:
        for name in systems:
            if name in dead:
                continue
            try:
                r = (
                    run_dense(length, device, dtype, args.repeats)
                    if name == "dense-sdpa"
                    else run_lsh(name, length, device, dtype, args.repeats)
                )
            except (RuntimeError, torch.OutOfMemoryError) as e:
                if not is_oom(e):
                    raise
                print(f"{name} L={length}: OOM; stopping its ladder")
                dead.add(name)
                continue
            finally:
                if device == "cuda":
                    torch.cuda.empty_cache()
            rows.append({"length": length, "system": name, **r})
            print(
                f"{name:>10} L={length:>8}: {r['ms']:9.2f} ms  {r['tok_s']:12.0f} tok/s  peak {r['peak_gib']:.2f} GiB",
                flush=True,
            )
    print("\n| L | core | fwd+bwd ms | tok/s | peak GiB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['length']} | {r['system']} | {r['ms']:.2f} | {r['tok_s']:.0f} | {r['peak_gib']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "dtype": str(dtype), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
