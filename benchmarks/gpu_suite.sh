#!/usr/bin/env bash
# One prepared run on one H100/H200 (offline, no deepspeed installed), in under 8 minutes with every Triton compile
# included (step budgets from the compile table: ~1-9 s per kernel specialisation on a 2-core CPU, benchmarks/RESULTS.md):
#   1. pytest tests/gpu            every attention core (compiled Triton included) vs the float64 reference
#   2. attention core              fwd+bwd of triton vs blockwise vs dense SDPA flash, 16K..1M tokens
#   3. train-step ladder           ours vs HF Reformer vs dense SDPA, 16K..4M tokens: tok/s, peak GiB, MFU,
#                                  then the longest sequence ours trains (doubling until OOM)
#   4. reformer-train              configs/million_1gpu.toml (1M-token sequences) for 20 DeepSpeed bf16 steps:
#                                  the loss falls and a checkpoint is written
#   5. ten million tokens          one bf16 step of the bench config at 5M and 10M tokens, one head per group
#                                  (configs/ten_million_1gpu.toml's model): peak GiB and bytes per token vs the
#                                  memory model (reformer_dist/model/memory.py)
# and prints a short table last. JSON goes to $OUT (the device tool's output folder) or ./gpu_suite_out.
#
#   bash benchmarks/fetch_gpu_wheels.sh          # on a connected machine: deepspeed and its needs -> .whl/
#   bash benchmarks/gpu_suite.sh                 # on the GPU machine (carry .whl/ along)
#   bash benchmarks/gpu_suite.sh --dry-run       # anywhere, CPU: every step at tiny sizes, checks the script
#   EXTRA=1 bash benchmarks/gpu_suite.sh         # also the duplication run and the 10M-token step (a second call)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT_DIR=${OUT:-$PWD/gpu_suite_out}
mkdir -p "$OUT_DIR"
source benchmarks/gpu_env.sh  # $PY, carried DeepSpeed wheels, the shared environment

declare -a NAMES STATUS SECS
step() {  # step NAME TIMEOUT CMD...: run with a ceiling, record status and seconds, keep going
  local name=$1 limit=$2; shift 2
  echo; echo "=== $name"; local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/${name// /_}.log" | tail -n 40
  local rc=${PIPESTATUS[0]}
  NAMES+=("$name"); STATUS+=("$([ "$rc" = 0 ] && echo ok || echo "FAILED rc=$rc")"); SECS+=($((SECONDS - t0)))
}

# the builtin corpus holds a few 1M-token training windows but too few for validation: no eval here
MILLION=(--config configs/million_1gpu.toml --set data.path=builtin --set train.max_steps=20 --set train.grad_accum=1
         --set train.warmup_steps=2 --set eval.every=0 --set eval.at_end=false --set checkpoint.every=20
         --set output.sample_tokens=0 --set output.dir="$OUT_DIR/million_run" --set logging.progress_bar=false)

if [ $DRY = 1 ]; then
  step "gpu tests" 300 $PY -m pytest -q --collect-only tests/gpu
  step "attention core" 300 $PY benchmarks/attention_core.py --dry-run --json "$OUT_DIR/core.json"
  step "train step ladder" 600 $PY benchmarks/train_step.py --dry-run --systems ours,hf,dense-sdpa \
    --json "$OUT_DIR/steps.json"
  step "predicted vs measured" 60 $PY benchmarks/predict_step.py --compare "$OUT_DIR/steps.json" --gpu auto \
    --json "$OUT_DIR/predicted.json"
  step "duplication 1024" 300 bash benchmarks/duplication_gpu.sh --dry-run
  step "million_1gpu" 300 $PY -m reformer_dist.cli.train "${MILLION[@]}" --dry-run
  step "ten million tokens" 300 $PY benchmarks/memory_per_token.py --dtype bf16 --head-groups 8 --layers 1 \
    --lengths 1024,2048 --json "$OUT_DIR/ten_million.json"
else
  step "gpu tests" 210 $PY -m pytest -q tests/gpu
  step "attention core" 50 $PY benchmarks/attention_core.py --lengths 16384,65536,262144,1048576 \
    --json "$OUT_DIR/core.json"
  step "train step ladder" 120 $PY benchmarks/train_step.py --lengths 16384,262144,1048576,4194304 \
    --systems ours,hf,dense-sdpa --steps 2 --max-baseline-len 262144 --find-max --json "$OUT_DIR/steps.json"
  step "predicted vs measured" 20 $PY benchmarks/predict_step.py --compare "$OUT_DIR/steps.json" --gpu auto \
    --json "$OUT_DIR/predicted.json"
  step "million_1gpu" 90 $PY -m reformer_dist.cli.train "${MILLION[@]}"
  # what does not fit the same 8 minutes, for a second call (EXTRA=1): the paper-scale duplication run (issue 22)
  # and one bf16 step of the bench config at 5M and 10M tokens with one head per group (issue 23)
  if [ "${EXTRA:-0}" = 1 ]; then
    step "duplication 1024" 300 env TRAIN_SECONDS=90 bash benchmarks/duplication_gpu.sh
    step "ten million tokens" 240 $PY benchmarks/memory_per_token.py --dtype bf16 --head-groups 8 \
      --lengths 5242880,10485760 --json "$OUT_DIR/ten_million.json"
  fi
fi

$PY - "$OUT_DIR" "$DRY" <<'EOF'
import json, sys
from pathlib import Path

out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
summary = {}
print("\n| core | L | fwd+bwd ms | tok/s | peak GiB |\n|---|---|---|---|---|")
if (out / "core.json").is_file():
    for r in json.loads((out / "core.json").read_text())["rows"]:
        print(f"| {r['system']} | {r['length']} | {r['ms']:.2f} | {r['tok_s']:.0f} | {r['peak_gib']:.2f} |")
    summary["core"] = json.loads((out / "core.json").read_text())
print("\n| system | L | tok/s | peak GiB | MFU | vs HF |\n|---|---|---|---|---|---|")
if (out / "steps.json").is_file():
    steps = json.loads((out / "steps.json").read_text())
    for r in steps["rows"]:
        print(f"| {r['system']} | {r['length']} | {r['tok_s']:.0f} | {r['peak_gib']:.2f} | {r['mfu']:.3f} | "
              f"{r.get('vs_hf', float('nan')):.2f} |")
    print(f"longest sequence ours trains: {steps.get('longest_ours')}")
    summary["steps"] = steps
run = out / "million_run"
if not dry and (run / "metrics.jsonl").is_file():
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if r.get("event") == "step"]
    latest = run / "checkpoints" / "latest"
    summary["million_1gpu"] = {"first_loss": losses[0], "last_loss": losses[-1], "steps": len(losses),
                               "checkpoint": latest.read_text() if latest.is_file() else None}
    print(f"\nmillion_1gpu: {len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f} "
          f"({'falling' if losses[-1] < losses[0] else 'NOT falling'}), checkpoint "
          f"{summary['million_1gpu']['checkpoint']}")
if (out / "ten_million.json").is_file():
    tm = json.loads((out / "ten_million.json").read_text())
    summary["ten_million"] = tm
    print(f"\nten million tokens: peaks {[round(p / 2**30, 1) for p in tm['peaks']]} GiB at {tm['lengths']} tokens, "
          f"{tm['slopes'][-1]:.0f} B/token (model {tm['model']:.0f})")
(out / "summary.json").write_text(json.dumps(summary, indent=1))
EOF

echo; echo "| step | status | seconds |"; echo "|---|---|---|"
fail=0
for i in "${!NAMES[@]}"; do
  echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${SECS[$i]} |"
  [ "${STATUS[$i]}" = ok ] || fail=1
done
exit $fail
