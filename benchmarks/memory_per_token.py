"""Activation memory per token of a training step (forward + backward) vs the memory model.

Bench config of shared/design/targets.md by default: byte vocabulary, d_model 512, 8 heads x 64, d_ff 2048,
6 layers, every layer LSH with 2 rounds, chunk 64, batch 1. Each length runs in a fresh subprocess; the
cost per token is the slope of peak memory between consecutive lengths (peak RSS on CPU,
max_memory_allocated on CUDA), which removes weights, optimizer and block constants.

    python benchmarks/memory_per_token.py                                   # fp32, L = 16K, 64K, 256K
    python benchmarks/memory_per_token.py --tracked --dtype bf16 --lengths 2048,4096   # exact, small L

``--tracked`` counts tensor allocations exactly (``reformer_dist.memtrack``) with the block constants of the
attention core, hashing, feed-forward and loss shrunk, so short lengths show the per-token cost without waiting for long
steps (bf16 autocast on CPU is slow at long lengths). The summary ends with the model's prediction, the
predicted peak at 1M and 4M tokens and the longest sequence on 80 GB and 141 GB GPUs; ``--json`` writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from reformer_dist.model.memory import GIB, predicted_bytes_per_token  # the memory model lives in the package


def bench_config(args, length: int):
    from reformer_dist import ReformerConfig

    a = 2 ** ((int(length).bit_length() + 1) // 2)
    return ReformerConfig(
        vocab_size=256,
        d_model=args.d_model,
        n_heads=args.heads,
        d_head=args.d_model // args.heads,
        d_ff=4 * args.d_model,
        n_layers=args.layers,
        n_hashes=args.hashes,
        chunk_len=64,
        axial_pos_shape=[a, max(64, 2 * length // a)],
        ff_chunk_len=4096,
        loss_chunk_len=4096,
        attention_backend=args.backend,
        head_groups=args.head_groups,
    )


def one(length: int, args) -> dict:
    """Peak bytes of one forward + backward at ``length`` (run in its own process)."""
    from reformer_dist import ReformerLM

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = bench_config(args, length)
    if args.tracked:  # chunk constants below the short lengths measured
        cfg.ff_chunk_len = cfg.loss_chunk_len = 256
    model = ReformerLM(cfg).to(dev)
    ids = torch.randint(0, 256, (1, length), device=dev)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    autocast = torch.autocast(dev, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step(x):
        with autocast:
            loss = model.loss(x, hash_seed=1)
        loss.backward()

    if args.tracked:
        from reformer_dist.kernels import blockwise
        from reformer_dist.memtrack import AllocationTracker
        from reformer_dist.model import hashing

        blockwise._BLOCK_ELEMS, hashing._HASH_BLOCK_ELEMS = 1 << 16, 1 << 14
        step(ids[:, :1024])  # parameter gradients exist before the measurement
        with AllocationTracker() as t:
            step(ids)
        return {"peak": float(t.peak_bytes), "dtype": str(dtype)}
    step(ids[:, :2048])  # warm-up: parameter gradients, allocator pools
    t0 = time.time()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step(ids)
        return {"peak": float(torch.cuda.max_memory_allocated()), "seconds": time.time() - t0}
    step(ids)
    return {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0, "seconds": time.time() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="16384,65536,262144")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--hashes", type=int, default=2)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--backend", default="auto", help="attention core (auto, reference, blockwise, triton)")
    ap.add_argument(
        "--head-groups",
        type=int,
        default=0,
        help="model.head_groups (0: by length, the model's rule; the prediction uses the largest length's)",
    )
    ap.add_argument("--tracked", action="store_true", help="count allocations exactly (small lengths)")
    ap.add_argument("--json", help="write the summary here")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args)))
        return
    peaks = {}
    for length in [int(x) for x in args.lengths.split(",")]:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            str(length),
            "--d-model",
            str(args.d_model),
            "--heads",
            str(args.heads),
            "--hashes",
            str(args.hashes),
            "--layers",
            str(args.layers),
            "--dtype",
            args.dtype,
            "--backend",
            args.backend,
            "--head-groups",
            str(args.head_groups),
        ]
        cmd += ["--tracked"] if args.tracked else []
        # glibc raises its mmap threshold up to 32 MiB as blocks are freed, then serves such tensors from the heap,
        # whose freed pages stay in RSS: a fixed threshold keeps RSS following tensor memory at every length
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072"))
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode:
            sys.exit(f"L={length} failed:\n{res.stderr[-3000:]}")
        rec = json.loads(res.stdout.strip().splitlines()[-1])
        peaks[length] = rec["peak"]
        took = f" ({rec['seconds']:.0f} s)" if "seconds" in rec else ""
        print(f"L={length}: peak {rec['peak'] / 2**20:.1f} MiB" + took, flush=True)
    ls = sorted(peaks)
    slopes = [(peaks[b] - peaks[a]) / (b - a) for a, b in zip(ls, ls[1:])]
    for (a, b), s in zip(zip(ls, ls[1:]), slopes):
        print(f"slope {a}->{b}: {s:.0f} B/token ({s / 1024:.2f} KiB)")
    groups = bench_config(args, ls[-1]).head_groups_for(ls[-1])
    terms = predicted_bytes_per_token(
        args.d_model,
        args.heads,
        args.d_model // args.heads,
        args.hashes,
        compute_bytes=2 if args.dtype == "bf16" else 4,
        groups=groups,
    )
    print(f"head groups: {groups} (model.head_groups={args.head_groups})")
    pred = sum(terms.values())
    for k, v in terms.items():
        print(f"  model: {k}: {v:.0f} B/token")
    slope = slopes[-1]
    const = peaks[ls[-1]] - slope * ls[-1]
    print(
        f"measured {slope:.0f} B/token, model {pred:.0f} B/token (measured / model {slope / pred:.3f}); "
        f"intercept {const / GIB:.2f} GiB"
    )
    params = 17.7e6 * (args.d_model / 512) ** 2 * args.layers / 6
    gpu_const = 16 * params + 1.0 * GIB  # fp32 weights+grads+Adam, plus CUDA context, blocks and allocator slack
    summary = {
        "lengths": ls,
        "peaks": [peaks[x] for x in ls],
        "slopes": slopes,
        "model": pred,
        "terms": terms,
        "dtype": args.dtype,
        "tracked": args.tracked,
        "head_groups": groups,
    }
    for n in (1 << 20, 1 << 22):
        summary[f"predicted_peak_gib_{n >> 20}M"] = (gpu_const + slope * n) / GIB
        print(f"predicted GPU peak at {n >> 20}M tokens: {(gpu_const + slope * n) / GIB:.1f} GiB")
    for cap in (80, 141):
        longest = (cap * 1e9 * 0.97 - gpu_const) / slope
        summary[f"longest_tokens_{cap}GB"] = longest
        print(f"longest sequence on a {cap} GB GPU: ~{longest / 1e6:.1f}M tokens")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
