"""Train-step benchmark: ours vs HF Reformer vs reformer-pytorch vs a dense SDPA transformer, in ONE run.

Bench config (shared/design/targets.md): byte vocab 256, d_model 512, 8 heads x 64, d_ff 2048, 6 layers,
causal, LSH 2 rounds, chunk 64 (1 before), batch 1, no dropout; a step = forward + backward (+ AdamW with
--optimizer). Prints tokens/s, peak GiB (CUDA), model FLOPs utilisation and the ratio to HF; each
system's ladder stops at its first OOM. With --find-max on CUDA, doubles the length until ours OOMs.

    python benchmarks/train_step.py                       # CPU: 4K only (a few minutes)
    python benchmarks/train_step.py --lengths 16384,65536,262144,1048576,4194304 --find-max --json steps.json  # GPU
    python benchmarks/train_step.py --dry-run             # CPU, tiny: checks the script end to end
    python benchmarks/train_step.py --systems ours,ours-grouped --lengths 4096,16384 --steps 5   # head-group cost
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

BENCH = dict(vocab=256, d_model=512, heads=8, d_head=64, d_ff=2048, layers=6, hashes=2, chunk=64)
PEAK_BF16_TFLOPS = 790.0  # measured H100 bf16 matmul peak (targets.md)


def axial_shape(length: int) -> list[int]:
    a = 2 ** (int(math.log2(length)) // 2)
    return [a, length // a]


def build_config(length: int, head_groups: int = 0):
    """The bench config for sequences of ``length`` tokens (a ReformerConfig)."""
    from reformer_dist import ReformerConfig

    b = BENCH
    return ReformerConfig(
        vocab_size=b["vocab"],
        d_model=b["d_model"],
        n_heads=b["heads"],
        d_head=b["d_head"],
        d_ff=b["d_ff"],
        n_layers=b["layers"],
        n_hashes=b["hashes"],
        chunk_len=b["chunk"],
        axial_pos_shape=axial_shape(length),
        ff_chunk_len=16384,
        loss_chunk_len=16384,
        head_groups=head_groups,
    )


def build_ours(length: int, device: str, dtype: torch.dtype, head_groups: int = 0):
    from reformer_dist import ReformerLM

    cfg = build_config(length, head_groups)
    model = ReformerLM(cfg).to(device)
    if dtype != torch.float32:
        model = model.to(dtype)

    def step(ids, seed):
        return model(ids, ids, hash_seed=seed)

    return model, step


def build_hf(length: int, device: str, dtype: torch.dtype):
    from transformers import ReformerConfig as HFConfig, ReformerModelWithLMHead

    b = BENCH
    cfg = HFConfig(
        vocab_size=b["vocab"],
        hidden_size=b["d_model"],
        num_attention_heads=b["heads"],
        attention_head_size=b["d_head"],
        feed_forward_size=b["d_ff"],
        attn_layers=["lsh"] * b["layers"],
        num_hashes=b["hashes"],
        lsh_attn_chunk_length=b["chunk"],
        lsh_num_chunks_before=1,
        lsh_num_chunks_after=0,
        is_decoder=True,
        axial_pos_shape=axial_shape(length),
        axial_pos_embds_dim=[b["d_model"] // 2, b["d_model"] // 2],
        max_position_embeddings=length,
        hidden_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0,
        chunk_size_lm_head=0,
        chunk_size_feed_forward=0,
    )
    model = ReformerModelWithLMHead(cfg).to(device)

    def step(ids, seed):
        return model(input_ids=ids, labels=ids).loss

    return model, step


def build_reformer_pytorch(length: int, device: str, dtype: torch.dtype):
    from reformer_pytorch import ReformerLM as RP  # optional dependency

    b = BENCH
    model = RP(
        num_tokens=b["vocab"],
        dim=b["d_model"],
        depth=b["layers"],
        heads=b["heads"],
        dim_head=b["d_head"],
        max_seq_len=length,
        bucket_size=b["chunk"],
        n_hashes=b["hashes"],
        causal=True,
        ff_chunks=8,
        axial_position_emb=True,
        axial_position_shape=axial_shape(length),
    ).to(device)

    def step(ids, seed):
        logits = model(ids)
        return F.cross_entropy(logits.view(-1, b["vocab"]), ids.view(-1))

    return model, step


class DenseBlock(nn.Module):
    def __init__(self, d, h, dff):
        super().__init__()
        self.h = h
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.ff = nn.Sequential(nn.Linear(d, dff), nn.GELU(), nn.Linear(dff, d))

    def forward(self, x):
        b, l, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, l, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, l, d)
        x = x + self.o(a)
        return x + self.ff(self.n2(x))


def build_dense(length: int, device: str, dtype: torch.dtype):
    from torch.utils.checkpoint import checkpoint

    b = BENCH
    emb = nn.Embedding(b["vocab"], b["d_model"])
    blocks = nn.ModuleList(DenseBlock(b["d_model"], b["heads"], b["d_ff"]) for _ in range(b["layers"]))
    head = nn.Linear(b["d_model"], b["vocab"])
    model = nn.ModuleList([emb, blocks, head]).to(device)

    def step(ids, seed):
        x = emb(ids)
        for blk in blocks:
            x = checkpoint(blk, x, use_reentrant=False)
        return F.cross_entropy(head(x).view(-1, b["vocab"]).float(), ids.view(-1))

    return model, step


def build_ours_grouped(length: int, device: str, dtype: torch.dtype):
    """Ours with model.head_groups = n_heads (one head per group) at every length: the cost of grouping."""
    return build_ours(length, device, dtype, head_groups=BENCH["heads"])


SYSTEMS = {
    "ours": build_ours,
    "ours-grouped": build_ours_grouped,
    "hf": build_hf,
    "reformer-pytorch": build_reformer_pytorch,
    "dense-sdpa": build_dense,
}


def model_flops(
    params: int,
    length: int,
    layers: int = BENCH["layers"],
    hashes: int = BENCH["hashes"],
    heads: int = BENCH["heads"],
    d_head: int = BENCH["d_head"],
    window: int = 2 * BENCH["chunk"],
) -> float:
    """FLOPs of one step for MFU: 6 x params x tokens plus attention (per round, QK and PV of each query over its
    ``window`` keys, x3 for forward + backward); the reversible recompute is not counted (it is overhead)."""
    return 6 * params * length + 4 * layers * hashes * heads * d_head * window * length * 3


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def measure(name: str, length: int, device: str, steps: int, optimizer: bool) -> dict:
    """tokens/s and peak memory of `steps` timed steps after one warm-up step."""
    amp = device == "cuda" and name in ("ours", "ours-grouped", "dense-sdpa")
    model, step = SYSTEMS[name](length, device, torch.float32)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if optimizer else None
    ids = torch.randint(0, BENCH["vocab"], (1, length), device=device)
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            loss = step(ids, i)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    flops = model_flops(params, length)
    mfu = flops / dt / (PEAK_BF16_TFLOPS * 1e12) if device == "cuda" else float("nan")
    del model, opt, ids, loss
    return {"tok_s": length / dt, "peak_gib": peak, "mfu": mfu, "step_s": dt, "params": params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ap.add_argument("--lengths", default="4096" if dev == "cpu" else "4096,16384,65536,262144,1048576,4194304")
    ap.add_argument("--systems", default="ours,hf,reformer-pytorch,dense-sdpa")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--optimizer", action="store_true", help="include AdamW in the step")
    ap.add_argument("--find-max", action="store_true", help="CUDA: double L until ours runs out of memory")
    ap.add_argument("--json", help="write the rows (and the longest sequence) here")
    ap.add_argument(
        "--max-baseline-len",
        type=int,
        default=0,
        help="run systems other than ours only up to this length (0: no limit)",
    )
    ap.add_argument("--dry-run", action="store_true", help="CPU, one tiny length, one step: check the script")
    args = ap.parse_args()
    if args.dry_run:
        dev, args.lengths, args.steps = "cpu", "512", 1
    lengths = [int(x) for x in args.lengths.split(",")]
    rows, dead, longest = [], set(), None
    print(f"device={dev} torch={torch.__version__} threads={torch.get_num_threads()}")
    for length in lengths:
        hf_tps = None
        for name in args.systems.split(","):
            if name in dead or (name != "ours" and 0 < args.max_baseline_len < length):
                continue
            try:
                r = measure(name, length, dev, args.steps, args.optimizer)
            except ImportError as e:
                print(f"{name}: not installed ({e.name}); skipped")
                dead.add(name)
                continue
            except (RuntimeError, torch.OutOfMemoryError) as e:
                if not is_oom(e):
                    raise
                print(f"{name} L={length}: OOM; stopping its ladder")
                dead.add(name)
                continue
            finally:
                gc.collect()
                if dev == "cuda":
                    torch.cuda.empty_cache()
            if name == "hf":
                hf_tps = r["tok_s"]
            rows.append((length, name, r))
            print(
                f"{name:>17} L={length:>8}: {r['tok_s']:>10.0f} tok/s  peak {r['peak_gib']:.2f} GiB  "
                f"MFU {r['mfu']:.3f}  step {r['step_s']:.3f}s",
                flush=True,
            )
        for l2, name, r in rows:
            if l2 == length and hf_tps:
                r["vs_hf"] = r["tok_s"] / hf_tps
        ours = {n: r for l2, n, r in rows if l2 == length and n in ("ours", "ours-grouped")}
        if len(ours) == 2:  # the step-time cost of head groups at this length, same run
            cost = ours["ours-grouped"]["step_s"] / ours["ours"]["step_s"] - 1
            ours["ours-grouped"]["grouping_cost"] = cost
            default = build_config(length).head_groups_for(length)
            print(
                f"{'':>17} L={length:>8}: one head per group costs {100 * cost:+.1f}% step time vs the default "
                f"(model.head_groups = 0: {default} group(s) at this length)"
            )
    if args.find_max and dev == "cuda":
        length, best = lengths[-1], None
        while True:
            length *= 2
            try:
                measure("ours", length, dev, 1, args.optimizer)
                best = length
            except (RuntimeError, torch.OutOfMemoryError) as e:
                if not is_oom(e):
                    raise
                break
        print(f"longest sequence ours trains: {best or 'below ' + str(length)}")
        longest = best
    print("\n| L | system | tok/s | peak GiB | MFU | vs HF |\n|---|---|---|---|---|---|")
    for length, name, r in rows:
        print(
            f"| {length} | {name} | {r['tok_s']:.0f} | {r['peak_gib']:.2f} | {r['mfu']:.3f} "
            f"| {r.get('vs_hf', float('nan')):.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": dev, "rows": [{"length": l, "system": n, **r} for l, n, r in rows], "longest_ours": longest},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
