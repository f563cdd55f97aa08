"""Does the model use long context? The three experiments of issue 22, one command each (docs/long_context.md).

    python benchmarks/long_context.py table2      # a: the paper's Table 2 (duplication) at CPU scale
    python benchmarks/long_context.py retrieval   # b: passkey retrieval, LSH vs the same model local-only
    python benchmarks/long_context.py positions   # c: loss by position on the built-in corpus, LSH vs full vs local
    python benchmarks/long_context.py table2 --smoke   # any of them at toy sizes: checks the pipeline in seconds

Each one makes its data (`reformer-data synth`, or the built-in corpus), trains every variant with
`reformer-train` for the same steps, scores it with `reformer-eval` and writes, under --out
(default runs/long_context/<experiment>): one run folder per variant, the eval JSON/PNG of each,
summary.json (numbers, the exact commands, wall time of each run) and summary.md (the table to paste
into benchmarks/RESULTS.md). Nothing is tuned after the fact: the defaults below are the experiment.

a (table2): 1 layer, d_model 128 (2 heads x 64), d_ff 256, chunk 64, duplication of length 1024 over 128
   symbols; trained with LSH-1, LSH-2, LSH-4 and full attention; each evaluated with 1/2/4/8 hash rounds
   and with full attention. Paper: 1 layer, d_model 256, trained longer on a GPU (99.9-100% for LSH-4
   evaluated with 8 rounds). --length/--d-model/--steps change it (GPU: benchmarks/duplication_gpu.sh).
b (retrieval): 4 layers [local, lsh, local, lsh] vs [local, local, local, local], d_model 128, chunk 64
   (local window 128 tokens), passkey documents of 4096 bytes, key at depths 0..1; accuracy per depth.
c (positions): 4 layers, d_model 128, seq_len 4096 on the built-in corpus: [local, lsh] x 2 vs [full] x 4
   vs [local] x 4, equal steps; loss by position of each, overlaid in positions.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

# the trainer's settings every experiment shares (a CPU run, one process)
COMMON = [
    "train.grad_clip=1.0",
    "eval.every=0",
    "eval.at_end=false",
    "checkpoint.every=0",
    "checkpoint.at_end=false",
    "output.sample_tokens=0",
    "logging.tensorboard=false",
    "logging.log_every=10",
]


def model_sets(
    d_model: int, n_layers: int, layers: list[str], n_hashes: int, chunk: int, max_len: int, vocab: int
) -> list[str]:
    heads = max(1, d_model // 64)
    side = 1 << ((max_len - 1).bit_length() + 1) // 2  # axial shape [a, b] with a * b >= max_len
    return [
        f"model.vocab_size={vocab}",
        f"model.d_model={d_model}",
        f"model.n_heads={heads}",
        f"model.d_head={d_model // heads}",
        f"model.d_ff={2 * d_model}",
        f"model.n_layers={n_layers}",
        f"model.attn_layers={json.dumps(layers)}",
        f"model.n_hashes={n_hashes}",
        f"model.chunk_len={chunk}",
        f"model.axial_pos_shape=[{-(-max_len // side)}, {side}]",
    ]


class Experiment:
    """Runs commands, times them and keeps them for the summary."""

    def __init__(self, out: Path, threads: int | None, time_limit: float | None = None):
        self.out, self.time_limit = out, time_limit
        self.runs: list[dict] = []
        self.steps: dict[str, int] = {}  # optimizer steps each variant reached
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = str(REPO) + os.pathsep + self.env.get("PYTHONPATH", "")
        if threads:
            self.env["OMP_NUM_THREADS"] = str(threads)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
            self.env.pop(k, None)

    def run(self, name: str, cmd: list[str], time_limit: float | None = None) -> float:
        """Run ``cmd``; past ``time_limit`` seconds it gets SIGTERM (reformer-train then checkpoints the step it
        is in and exits 0)."""
        print(f"\n=== {name}\n$ {shlex.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=REPO, env=self.env)
        try:
            p.wait(timeout=time_limit)
        except subprocess.TimeoutExpired:
            print(f"=== {name}: time limit {time_limit} s reached, stopping it (SIGTERM)", flush=True)
            p.send_signal(signal.SIGTERM)
            p.wait()
        dt = time.perf_counter() - t0
        self.runs.append({"name": name, "command": shlex.join(cmd), "seconds": round(dt, 1), "rc": p.returncode})
        if p.returncode != 0:
            raise SystemExit(f"long_context: {name} failed (exit {p.returncode}): {shlex.join(cmd)}")
        return dt

    def data(self, *args: str) -> None:
        self.run(f"data {args[0]}", [PY, "-m", "reformer_dist.cli.data", *args])

    def train(self, name: str, sets: list[str]) -> Path:
        run_dir = self.out / name
        steps = int(next(s for s in sets if s.startswith("train.max_steps=")).split("=")[1])
        sets = COMMON + [f"train.warmup_steps={min(50, steps // 10 + 1)}"] + sets + [f"output.dir={run_dir}"]
        self.run(
            f"train {name}",
            [
                PY,
                "-m",
                "reformer_dist.cli.train",
                "--config",
                "configs/quickstart.toml",
                *[a for s in sets for a in ("--set", s)],
            ],
            self.time_limit,
        )
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        # step records come every logging.log_every steps; end / preempted records carry the last step
        self.runs[-1]["steps_reached"] = max((r["step"] for r in records if isinstance(r.get("step"), int)), default=0)
        self.steps[name] = self.runs[-1]["steps_reached"]
        # stopped by the time limit: no final weights folder, but the checkpoint of the step it stopped at
        return run_dir / "model" if (run_dir / "model").is_dir() else run_dir / "checkpoints"

    def eval(self, name: str, model: Path, *args: str) -> dict:
        out = self.out / f"{name}.json"
        self.run(
            f"eval {name}", [PY, "-m", "reformer_dist.cli.eval", str(model), *args, "--out", str(out), "--no-progress"]
        )
        return json.loads(out.read_text())

    def finish(self, summary: dict, table: str) -> None:
        summary["runs"], summary["steps_reached"] = self.runs, self.steps
        table += (
            "\n\nsteps reached: "
            + ", ".join(f"{k} {v}" for k, v in self.steps.items())
            + "; wall time per run: "
            + ", ".join(f"{r['name']} {r['seconds']:.0f} s" for r in self.runs)
        )
        summary["wall_seconds"] = round(sum(r["seconds"] for r in self.runs), 1)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        (self.out / "summary.md").write_text(table + "\n")
        print("\n" + table)
        print(f"\nwall time {summary['wall_seconds']} s; {self.out / 'summary.json'}")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def table2(a: argparse.Namespace, x: Experiment) -> None:
    n = a.length
    x.data(
        "synth",
        "--task",
        "duplication",
        "--lengths",
        str(n),
        "--symbols",
        str(a.symbols),
        "--examples",
        str(a.examples),
        "--train-examples",
        str(a.train_examples),
        "--seed",
        "0",
        "--out",
        str(x.out / "data"),
        "--overwrite",
    )
    rounds = "1,2,4,8,full"
    results = {}
    variants = (("lsh1", ["lsh"], 1), ("lsh2", ["lsh"], 2), ("lsh4", ["lsh"], 4), ("full", ["full"], 1))
    for name, layers, hashes in [v for v in variants if v[0] in a.variants.split(",")]:
        sets = model_sets(a.d_model, 1, layers, hashes, a.chunk, n, a.symbols + 2) + [
            f"data.path={x.out / 'data'}",
            f"data.seq_len={n}",
            "data.document_masking=true",
            "data.reset_positions=true",
            f"train.max_steps={a.steps}",
            f"train.micro_batch={a.batch}",
            f"train.lr={a.lr}",
        ]
        model = x.train(name, sets)
        args = ["--data", str(x.out / "data"), "--task", "--batch-size", "4"]
        res = x.eval(name, model, *args, *(["--n-hashes", rounds] if layers == ["lsh"] else []))
        results[name] = {_key(r["n_hashes"]): r["accuracy"] for r in res["rows"]}
    cols = ["1", "2", "4", "8", "full"]
    lines = [
        f"Duplication, length {n}, {a.symbols} symbols, 1 layer d_model {a.d_model}, max {a.steps} steps x "
        f"{a.batch} sequences (accuracy on the copied half, teacher-forced; chance {100 / a.symbols:.1f}%)",
        "",
        "| trained with | eval LSH-1 | LSH-2 | LSH-4 | LSH-8 | full |",
        "|---|---|---|---|---|---|",
    ]
    for name, accs in results.items():
        row = [None] * 4 + [accs.get("trained")] if name == "full" else [accs.get(c) for c in cols]
        lines.append(f"| {name} | " + " | ".join(_pct(v) for v in row) + " |")
    x.finish({"experiment": "table2", "args": vars(a), "accuracy": results}, "\n".join(lines))


def _key(r) -> str:
    return "trained" if r is None else str(r)


def retrieval(a: argparse.Namespace, x: Experiment) -> None:
    n = a.length
    x.data(
        "synth",
        "--task",
        "passkey",
        "--lengths",
        str(n),
        "--depths",
        a.depths,
        "--examples",
        str(a.examples),
        "--train-examples",
        str(a.train_examples),
        "--seed",
        "0",
        "--out",
        str(x.out / "data"),
        "--overwrite",
    )
    results = {}
    for name, layers in (("lsh", ["local", "lsh"] * (a.layers // 2)), ("local", ["local"] * a.layers)):
        sets = model_sets(a.d_model, a.layers, layers, a.n_hashes, a.chunk, n, 257) + [
            f"data.path={x.out / 'data'}",
            f"data.seq_len={n}",
            "data.document_masking=true",
            "data.reset_positions=true",
            f"train.max_steps={a.steps}",
            f"train.micro_batch={a.batch}",
            f"train.lr={a.lr}",
        ]
        res = x.eval(name, x.train(name, sets), "--data", str(x.out / "data"), "--task", "--batch-size", "2")
        results[name] = {f"{c['depth']:g}": c["accuracy"] for c in res["rows"][0]["cells"]}
    depths = list(results["lsh"])
    window = 2 * a.chunk  # local attention: own chunk + 1 before
    lines = [
        f"Passkey retrieval, {n}-byte documents, {a.layers} layers d_model {a.d_model}, local window {window} "
        f"tokens, {a.steps} steps x {a.batch} (accuracy on the key digits; chance 10%)",
        "",
        "| model | " + " | ".join(f"depth {d}" for d in depths) + " |",
        "|---|" + "---|" * len(depths),
    ]
    for name, accs in results.items():
        lines.append(f"| {name} | " + " | ".join(_pct(accs[d]) for d in depths) + " |")
    x.finish({"experiment": "retrieval", "args": vars(a), "accuracy": results}, "\n".join(lines))


def positions(a: argparse.Namespace, x: Experiment) -> None:
    n = a.length
    results, files = {}, []
    for name, layers in (
        ("lsh", ["local", "lsh"] * (a.layers // 2)),
        ("full", ["full"] * a.layers),
        ("local", ["local"] * a.layers),
    ):
        sets = model_sets(a.d_model, a.layers, layers, a.n_hashes, a.chunk, n, 257) + [
            "data.path=builtin",
            f"data.seq_len={n}",
            f"train.max_steps={a.steps}",
            f"train.micro_batch={a.batch}",
            f"train.lr={a.lr}",
        ]
        res = x.eval(
            name,
            x.train(name, sets),
            "--data",
            "builtin",
            "--seq-len",
            str(n),
            "--max-tokens",
            str(a.eval_tokens),
            "--no-plot",
        )
        results[name] = res["rows"][0]
        files.append(str(x.out / f"{name}.json"))
    x.run(
        "plot",
        [
            PY,
            "-m",
            "reformer_dist.cli.plot",
            *files,
            "--out",
            str(x.out / "positions.png"),
            "--title",
            f"loss by position, {n}-byte windows of the built-in corpus, {a.steps} steps",
        ],
    )
    bins = [f"{b['lo']}-{b['hi']}" for b in results["lsh"]["by_position"]]
    lines = [
        f"Loss by position (nats/byte), built-in corpus validation, seq_len {n}, {a.layers} layers d_model "
        f"{a.d_model}, {a.steps} steps x {a.batch}; local window {2 * a.chunk}",
        "",
        "| positions | " + " | ".join(results) + " |",
        "|---|" + "---|" * len(results),
    ]
    for i, b in enumerate(bins):
        vals = [results[k]["by_position"][i]["loss"] for k in results]
        lines.append(f"| {b} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals) + " |")
    lines.append("| all | " + " | ".join(f"{results[k]['loss']:.3f}" for k in results) + " |")
    x.finish({"experiment": "positions", "args": vars(a), "rows": results}, "\n".join(lines))


# experiment -> (its function, full-size defaults, --smoke sizes)
EXPERIMENTS: dict[str, tuple[Callable[..., Any], dict[str, Any], dict[str, Any]]] = {
    "table2": (
        table2,
        dict(
            length=1024,
            symbols=128,
            d_model=128,
            chunk=64,
            steps=600,
            batch=8,
            lr=1e-3,
            examples=32,
            train_examples=6000,
            variants="lsh1,lsh2,lsh4,full",
        ),
        dict(
            length=64,
            symbols=8,
            d_model=32,
            chunk=8,
            steps=2,
            batch=2,
            lr=1e-3,
            examples=2,
            train_examples=16,
            variants="lsh1,lsh2,lsh4,full",
        ),
    ),
    "retrieval": (
        retrieval,
        dict(
            length=4096,
            depths="0,0.25,0.5,0.75,0.9,1",
            layers=4,
            d_model=128,
            chunk=64,
            n_hashes=2,
            steps=600,
            batch=4,
            lr=1e-3,
            examples=16,
            train_examples=3000,
        ),
        dict(
            length=256,
            depths="0,0.5,1",
            layers=2,
            d_model=32,
            chunk=16,
            n_hashes=2,
            steps=2,
            batch=2,
            lr=1e-3,
            examples=2,
            train_examples=8,
        ),
    ),
    "positions": (
        positions,
        dict(
            length=4096, layers=4, d_model=128, chunk=64, n_hashes=2, steps=600, batch=2, lr=1e-3, eval_tokens=200_000
        ),
        dict(length=128, layers=2, d_model=32, chunk=16, n_hashes=2, steps=2, batch=2, lr=1e-3, eval_tokens=512),
    ),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("experiment", choices=sorted(EXPERIMENTS))
    p.add_argument("--smoke", action="store_true", help="toy sizes: checks the pipeline end to end in seconds")
    p.add_argument("--out", type=Path, help="output folder (default runs/long_context/<experiment>[_smoke])")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every run")
    p.add_argument(
        "--time-limit",
        type=float,
        help="seconds per training run: then it checkpoints and stops, and "
        "the checkpoint is evaluated (the steps reached are in its metrics.jsonl)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="change a default of the experiment (e.g. --set steps=2000 --set length=2048)",
    )
    a = p.parse_args(argv)
    fn, full, smoke = EXPERIMENTS[a.experiment]
    params: dict[str, Any] = dict(smoke if a.smoke else full)
    for item in a.set:
        k, _, v = item.partition("=")
        if k not in params:
            p.error(f"--set {item}: unknown parameter {k!r}; this experiment has {sorted(params)}")
        params[k] = type(params[k])(v)
    ns = argparse.Namespace(**params)
    out = a.out or REPO / "runs" / "long_context" / (a.experiment + ("_smoke" if a.smoke else ""))
    out.mkdir(parents=True, exist_ok=True)
    fn(ns, Experiment(out, a.threads, a.time_limit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
