"""Measure activation bytes per token of a training step and compare with the memory model in
docs/sequence_parallel.md.

Each length runs in a fresh subprocess; the marginal cost per token is the slope of peak memory over L
(peak RSS on CPU, max_memory_allocated on CUDA), which removes weights, optimizer and allocator overheads.

    python benchmarks/memory_per_token.py                  # CPU, small model, L = 8K..32K
    python benchmarks/memory_per_token.py --lengths 65536,262144,1048576 --d-model 512 --heads 8 --layers 6
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch


def predicted_bytes_per_token(d_model: int, n_heads: int, n_hashes: int, n_layers: int, sp: int = 1) -> float:
    """Memory model (fp32 streams, blockwise attention core); independent of n_layers by design.

    Streams y1, y2, their gradients and the rebuilt inputs: 6 D. LM head: saved input (2D), its
    LayerNorm output (2D) and the embedding output (D): 5 D. The reversible backward's concatenated G
    outputs and input gradients: 2 D. One layer's attention recompute held for its backward: LayerNorm
    output, qk and v projections (3 D), per round the sorted qk, keys, values, chunk output, unsorted
    output and merge product (6 R D). All fp32 (4 bytes); plus int64 sort permutation, inverse,
    positions and buckets per round and head (4 x 8 x R x H). Divided by P under sequence parallelism
    (tokens and heads are both split). Block temporaries of the attention core are a constant (<= a few
    hundred MiB), reached once L x R x H x window >= 16M logits.
    """
    floats = 6 * d_model + 5 * d_model + 2 * d_model + 3 * d_model + 6 * n_hashes * d_model
    ints = 4 * n_hashes * n_heads
    return (4 * floats + 8 * ints) / sp


def one(length: int, args) -> float:
    from reformer_dist import ReformerConfig, ReformerLM

    a = 2 ** (int(length).bit_length() // 2)
    cfg = ReformerConfig(vocab_size=256, d_model=args.d_model, n_heads=args.heads, d_head=args.d_model // args.heads,
                         d_ff=4 * args.d_model, n_layers=args.layers, n_hashes=args.hashes, chunk_len=64,
                         axial_pos_shape=[a, max(1, length // a) * 2], ff_chunk_len=4096, loss_chunk_len=4096)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = ReformerLM(cfg).to(dev)
    ids = torch.randint(0, 256, (1, length), device=dev)
    model(ids[:, :2048], ids[:, :2048]).backward()  # warm-up at a small length
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
        model(ids, ids).backward()
        return float(torch.cuda.max_memory_allocated())
    model(ids, ids).backward()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="16384,32768,65536")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--hashes", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps({"peak": one(args.one, args)}))
        return
    peaks = {}
    for length in [int(x) for x in args.lengths.split(",")]:
        cmd = [sys.executable, __file__, "--one", str(length), "--d-model", str(args.d_model), "--heads",
               str(args.heads), "--hashes", str(args.hashes), "--layers", str(args.layers)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        peaks[length] = json.loads(out.strip().splitlines()[-1])["peak"]
        print(f"L={length}: peak {peaks[length] / 2**20:.1f} MiB", flush=True)
    ls = sorted(peaks)
    slope = (peaks[ls[-1]] - peaks[ls[-2]]) / (ls[-1] - ls[-2])  # the two longest: past the block constant
    pred = predicted_bytes_per_token(args.d_model, args.heads, args.hashes, args.layers)
    print(f"measured {slope:.0f} B/token, model {pred:.0f} B/token (ratio {slope / pred:.2f})")


if __name__ == "__main__":
    main()
