"""Quickstart step time by thread setting, with idle cores and with one busy core: `auto` vs 1 vs all cores.

One command runs the quickstart (configs/quickstart.toml, evaluation, sample and saves off) once per thread
setting, first with the cores idle, then with a CPU hog that this script starts, pinned to the last core, and
stops afterwards. It reports each run's mean step time (steps 2.., so `auto`'s probes count against it; step 1
pays one-time costs in every setting) and the wall time of the command, and checks the targets of
`train.threads = "auto"`: with the hog within 1.3x of the best fixed setting, with idle cores within 5% of all
cores (the default before `auto`). Results are appended to benchmarks/RESULTS.md (``--no-write``: printed only).

    python benchmarks/cpu_threads.py                    # 60 steps per run, ~4 min on 2 cores
    python benchmarks/cpu_threads.py --steps 0 --settings auto   # the whole quickstart (README's time), idle + hog
    python benchmarks/cpu_threads.py --dry-run          # 4 steps, tiny batch: checks the script end to end

Run it alone: other processes on the machine are part of what it measures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
TARGET_HOG, TARGET_IDLE = 1.3, 1.05


@contextmanager
def cpu_hog(core: int, nice: int) -> Iterator[int]:
    """A busy loop on `core` (a separate process, niced by `nice`) for the duration of the block; its pid."""
    code = f"import os; os.sched_setaffinity(0, {{{core}}}); os.nice({nice})\nwhile True:\n    pass\n"
    hog = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.5)
        if hog.poll() is not None:
            raise RuntimeError(f"cpu hog exited at once (code {hog.returncode})")
        yield hog.pid
    finally:
        hog.kill()
        hog.wait()


def run_quickstart(threads: str, steps: int, out: Path, extra: list[str]) -> dict:
    """One quickstart run at train.threads = `threads`: mean step time (steps 2..), wall time, counts used."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    sets = [f"output.dir={out}", f"train.threads={threads}", "logging.progress_bar=false"]
    if steps:
        sets += [
            f"train.max_steps={steps}",
            "eval.every=0",
            "eval.at_end=false",
            "output.sample_tokens=0",
            "output.save_model=false",
            "checkpoint.at_end=false",
        ]
    cmd = [sys.executable, "-m", "reformer_dist.cli.train", "--config", str(REPO / "configs/quickstart.toml")]
    for s in sets + extra:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"train.threads={threads}: exit {p.returncode}\n{p.stderr[-3000:]}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in recs if r["event"] == "step"]
    timed = [r["step_time_s"] for r in steps_[1:]]
    return {
        "threads": threads,
        "mean_step_s": sum(timed) / len(timed),
        "wall_s": wall,
        "steps": len(steps_),
        "counts": sorted({r["threads"] for r in steps_}),
        "choices": [(r["step"], r["threads"], r["reason"]) for r in recs if r["event"] == "threads"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="steps per run (0: the whole quickstart with its evals)")
    ap.add_argument("--settings", default="auto,1,all", help="train.threads values to compare (all: every core)")
    ap.add_argument("--hog-nice", type=int, default=0, help="niceness of the hog (0: as important as the run)")
    ap.add_argument("--results", default=str(REPO / "benchmarks/RESULTS.md"), help="append the results here")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--dry-run", action="store_true", help="4 steps of micro-batch 2, nothing written")
    args = ap.parse_args()
    extra = []
    if args.dry_run:
        args.steps, args.no_write, extra = 4, True, ["train.micro_batch=2"]
    cores = sorted(os.sched_getaffinity(0))
    settings = [str(len(cores)) if s == "all" else s for s in args.settings.split(",")]
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for condition in ("idle", "hog"):
            ctx = cpu_hog(cores[-1], args.hog_nice) if condition == "hog" else nullcontext()
            with ctx:
                for s in settings:
                    r = run_quickstart(s, args.steps, Path(tmp) / f"{condition}-{s}", extra)
                    r["condition"] = condition
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    verdicts = []
    for condition, target, against in (("hog", TARGET_HOG, "best fixed"), ("idle", TARGET_IDLE, "all cores")):
        by = {r["threads"]: r["mean_step_s"] for r in rows if r["condition"] == condition}
        if not {"auto", "1", str(len(cores))} <= by.keys():
            continue  # the targets compare auto with 1 thread and all cores
        ref = min(by["1"], by[str(len(cores))]) if condition == "hog" else by[str(len(cores))]
        ratio = by["auto"] / ref
        verdicts.append(
            f"{condition}: auto / {against} = {ratio:.2f} (target <= {target}: "
            f"{'met' if ratio <= target else f'missed by {ratio / target - 1:.0%}'})"
        )
    table = [
        "| cores | setting | mean step s (idle) | wall s (idle) | mean step s (hog) | wall s (hog) "
        "| counts used (idle / hog) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in settings:
        i, h = (next(r for r in rows if r["condition"] == c and r["threads"] == s) for c in ("idle", "hog"))
        table.append(
            f"| {len(cores)} | {s} | {i['mean_step_s']:.3f} | {i['wall_s']:.1f} | {h['mean_step_s']:.3f} | "
            f"{h['wall_s']:.1f} | {i['counts']} / {h['counts']} |"
        )
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = " ".join(["python benchmarks/cpu_threads.py", *sys.argv[1:]])
    text = "\n".join(
        [
            f"## Quickstart threads: {' vs '.join(settings)}, idle and with one busy core ({when})",
            f"`{cmd}` on {platform.node()} ({len(cores)} cores; load average {load_before[0]:.2f} before "
            f"the first run). {'Whole quickstart' if not args.steps else f'{args.steps} steps'} per run, mean step "
            f"time of steps 2.. (auto's probes included); the hog is a busy Python loop pinned to core {cores[-1]}, "
            f"nice {args.hog_nice}.",
            "",
            *table,
            "",
            *[f"- {v}" for v in verdicts],
            *[f"- auto's choices ({r['condition']}): {r['choices']}" for r in rows if r["threads"] == "auto"],
            "",
        ]
    )
    print(text)
    if not args.no_write:
        with open(args.results, "a") as f:
            f.write("\n" + text)
        print(f"appended to {args.results}")


if __name__ == "__main__":
    main()
