"""Generation benchmark: tokens/s after a long prompt, ours cached vs ours full recompute vs HF's cached
``generate``, in ONE run (same weights: HF's model is our export, ``checkpoint/hf_adapter.py``).

Model: byte vocab 256, d_model 256, 4 heads x 64, d_ff 1024, 6 layers alternating local/LSH (the enwik8
layout), 2 hash rounds, chunk 64 (1 before), automatic bucket count, axial positions [128, 256] (32K), fp32,
batch 1, greedy. For each system: the prompt pass alone (1 new token) and then N new tokens; decode tok/s
= (N - 1) / (time(N) - time(1)). Full recompute costs a 16K forward per token, so it runs --full-tokens
tokens and is extrapolated per token (said in the output).

    uptime; python benchmarks/generation.py                        # CPU: 16K prompt, 256 tokens (~10 min)
    python benchmarks/generation.py --threads 1                    # one intra-op thread (busy machines)
    python benchmarks/generation.py --dry-run                      # tiny: checks the script end to end
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

BENCH: dict[str, Any] = dict(
    vocab_size=256,
    d_model=256,
    n_heads=4,
    d_head=64,
    d_ff=1024,
    n_layers=6,
    attn_layers=["local", "lsh"] * 3,
    n_hashes=2,
    chunk_len=64,
    axial_pos_shape=[128, 256],
)
TINY: dict[str, Any] = dict(
    BENCH,
    d_model=32,
    n_heads=2,
    d_head=16,
    d_ff=64,
    n_layers=2,
    attn_layers=["local", "lsh"],
    chunk_len=8,
    axial_pos_shape=[16, 16],
)


def build(spec: dict, seed: int, length: int):
    """(ours, hf or None): our random-init model and the same weights in transformers' ReformerModelWithLMHead.

    HF fixes an automatic bucket count on its first call (and keeps it on the module), so its config gets
    the count ours uses at ``length`` tokens, which stays the same while generating here."""
    from reformer_dist import ReformerConfig, ReformerLM

    torch.manual_seed(seed)
    ours = ReformerLM(ReformerConfig(**spec)).eval()
    try:
        from transformers import ReformerConfig as HFConfig, ReformerModelWithLMHead
    except ImportError:
        return ours, None
    from reformer_dist.checkpoint.hf_adapter import EXTRA_KEY, to_hf_config, to_hf_state_dict

    hf_cfg = {k: v for k, v in to_hf_config(ours.cfg).items() if k not in (EXTRA_KEY, "model_type", "architectures")}
    factors = ours.cfg.bucket_factors(ours.padded_length(length))
    hf_cfg["num_buckets"] = factors if len(factors) > 1 else factors[0]
    hf = ReformerModelWithLMHead(HFConfig(**hf_cfg)).eval()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), ours.cfg), strict=False)
    return ours, hf


T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run_ours(model, prompt: torch.Tensor, n: int, use_cache: bool) -> tuple[float, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        t, (ids, logits) = timed(
            lambda: model.generate(prompt, n, temperature=0, use_cache=use_cache, return_logits=True)
        )
    return t, ids, logits


def run_hf(hf, prompt: torch.Tensor, n: int) -> tuple[float, torch.Tensor]:
    # HF's Reformer prints a warning line per step for generate() keywords it does not know
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        t, ids = timed(
            lambda: hf.generate(
                prompt,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
                eos_token_id=None,
            )
        )
    return t, ids


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=16384, help="prompt tokens")
    ap.add_argument("--new", type=int, default=256, help="new tokens (cached systems)")
    ap.add_argument("--full-tokens", type=int, default=3, help="new tokens timed for full recompute (extrapolated)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--systems", default="ours-cached,ours-full,hf-cached")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--dry-run", action="store_true", help="tiny model and lengths: checks the script end to end")
    a = ap.parse_args(argv)
    if a.dry_run:
        a.prompt, a.new, a.full_tokens = 40, 8, 2
    if a.threads:
        torch.set_num_threads(a.threads)
    spec = TINY if a.dry_run else BENCH
    ours, hf = build(spec, a.seed, a.prompt)
    prompt = torch.randint(0, spec["vocab_size"], (1, a.prompt), generator=torch.Generator().manual_seed(a.seed + 1))
    warm = prompt[:, : 4 * spec["chunk_len"]]  # first calls pay one-time costs: not timed
    res: dict = {
        "prompt": a.prompt,
        "new": a.new,
        "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg(),
        "torch": torch.__version__,
        "systems": {},
    }
    systems = a.systems.split(",")
    print(
        f"prompt {a.prompt} tokens, {a.new} new, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {res['load_avg'][0]:.2f} at start",
        flush=True,
    )
    cached = None
    for name in systems:
        if name == "ours-cached":
            run_ours(ours, warm, 2, True)
            t1, _, _ = run_ours(ours, prompt, 1, True)
            tn, ids, logits = run_ours(ours, prompt, a.new, True)
            cached = (ids, logits)
            r = dict(prompt_s=t1, total_s=tn, decode_tok_s=(a.new - 1) / max(tn - t1, 1e-9))
        elif name == "ours-full":
            k = a.full_tokens
            run_ours(ours, warm, 2, False)
            tk, ids, logits = run_ours(ours, prompt, k, False)
            per = tk / k
            r = dict(
                timed_tokens=k,
                total_s=tk,
                per_token_s=per,
                decode_tok_s=1 / per,
                extrapolated_total_s=per * a.new,
                extrapolated=True,
            )
            if cached is not None:  # the cache's tokens and logits vs full recompute on the first k steps
                r["same_tokens_first_k"] = bool(torch.equal(ids, cached[0][:, : a.prompt + k]))
                spread = logits.std(-1)
                r["max_logit_dev_rel"] = float(((cached[1][:, :k] - logits).abs().amax(-1) / spread).max())
        elif name == "hf-cached":
            if hf is None:
                print("hf-cached: transformers is not installed; skipped")
                continue
            run_hf(hf, warm, 2)
            t1, _ = run_hf(hf, prompt, 1)
            tn, ids = run_hf(hf, prompt, a.new)
            r = dict(prompt_s=t1, total_s=tn, decode_tok_s=(a.new - 1) / max(tn - t1, 1e-9))
        else:
            raise SystemExit(f"--systems: unknown system {name!r}")
        res["systems"][name] = r
        print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    res["load_avg_end"] = os.getloadavg()
    print(f"load average {res['load_avg_end'][0]:.2f} at end")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
