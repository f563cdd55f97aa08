"""Activation bytes per token per GPU under sequence parallelism, for every layout, vs the memory model.

Starts ``torchrun`` with P gloo processes (CPU) per layout and length; each rank counts its tracked
allocations (``reformer_dist.memtrack``, exact, block constants shrunk) over one forward + backward of the
bench config; the cost per token per GPU is the slope between two lengths. Compared with
``reformer_dist.model.memory.predicted_bytes_per_token`` for the layout (``--head-groups``: model.head_groups).

    python benchmarks/sp_memory.py --layouts 2x1,1x2,4x1,2x2 --lengths 4096,8192 --layers 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def worker(args) -> None:
    import torch.distributed as dist

    from reformer_dist import ReformerConfig, ReformerLM
    from reformer_dist.kernels import blockwise
    from reformer_dist.memtrack import AllocationTracker
    from reformer_dist.model import hashing
    from reformer_dist.parallel.sequence import new_sequence_parallel, sequence_parallel_loss

    dist.init_process_group("gloo")
    blockwise._BLOCK_ELEMS, hashing._HASH_BLOCK_ELEMS = 1 << 14, 1 << 12
    length, u = args.one, args.ulysses
    a = 2 ** ((length.bit_length() + 1) // 2)
    cfg = ReformerConfig(
        vocab_size=256,
        d_model=args.d_model,
        n_heads=args.heads,
        d_head=args.d_model // args.heads,
        d_ff=4 * args.d_model,
        n_layers=args.layers,
        n_hashes=args.hashes,
        chunk_len=64,
        attn_layers=["lsh"] * args.layers,
        axial_pos_shape=[a, max(64, 2 * length // a)],
        ff_chunk_len=256,
        loss_chunk_len=256,
        attention_backend="blockwise",
        head_groups=args.head_groups,
    )
    torch.manual_seed(0)
    model = ReformerLM(cfg)
    p = dist.get_world_size()
    sp, sp_rank, _, _ = new_sequence_parallel(p, u)
    ids = torch.randint(0, 256, (1, length + 1), generator=torch.Generator().manual_seed(1))
    n = length // p
    x, y = ids[:, :-1][:, sp_rank * n : (sp_rank + 1) * n], ids[:, 1:][:, sp_rank * n : (sp_rank + 1) * n]

    def step():
        loss, _ = sequence_parallel_loss(model, x, y, position_offset=sp_rank * n, sp=sp, hash_seed=3)
        loss.backward()

    step()  # parameter gradients exist before the measurement
    with AllocationTracker() as t:
        step()
    peaks = [None] * p
    dist.all_gather_object(peaks, t.peak_bytes)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(peaks))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default="2x1,1x2,2x2", help="comma list of UxK (Ulysses ranks x bucket ranks)")
    ap.add_argument("--lengths", default="4096,8192")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--hashes", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--head-groups", type=int, default=0, help="model.head_groups (0: by length)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ulysses", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        worker(args)
        return
    from reformer_dist import ReformerConfig
    from reformer_dist.model.memory import predicted_bytes_per_token

    rows = []
    for layout in args.layouts.split(","):
        u, k = (int(x) for x in layout.split("x"))
        peaks = {}
        for length in [int(x) for x in args.lengths.split(",")]:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "peaks.json"
                cmd = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    f"--nproc_per_node={u * k}",
                    f"--master_port={free_port()}",
                    __file__,
                    "--one",
                    str(length),
                    "--ulysses",
                    str(u),
                    "--out",
                    str(out),
                    "--d-model",
                    str(args.d_model),
                    "--heads",
                    str(args.heads),
                    "--hashes",
                    str(args.hashes),
                    "--layers",
                    str(args.layers),
                    "--head-groups",
                    str(args.head_groups),
                ]
                res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
                if res.returncode:
                    sys.exit(f"{layout} L={length} failed:\n{res.stderr[-3000:]}")
                peaks[length] = max(json.loads(out.read_text()))
        a, b = sorted(peaks)
        slope = (peaks[b] - peaks[a]) / (b - a)
        a = 2 ** ((b.bit_length() + 1) // 2)
        groups = ReformerConfig(
            d_model=args.d_model,
            n_heads=args.heads,
            d_head=args.d_model // args.heads,
            head_groups=args.head_groups,
            axial_pos_shape=[a, max(64, 2 * b // a)],
        ).head_groups_for(b, u)
        pred = sum(
            predicted_bytes_per_token(
                args.d_model, args.heads, args.d_model // args.heads, args.hashes, ulysses=u, bucket=k, groups=groups
            ).values()
        )
        rows.append({"layout": layout, "gpus": u * k, "measured": slope, "model": pred})
        print(
            f"{layout}: measured {slope:.0f} B/token of the sequence per GPU, model {pred:.0f} "
            f"(measured / model {slope / pred:.3f})",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
