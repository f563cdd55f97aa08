"""`reformer-plot`: train/eval loss curves of one or more runs, from their metrics.jsonl, as a PNG.

    reformer-plot runs/quickstart --out loss.png
    reformer-plot runs/a runs/b --out compare.png --smooth 20 --x tokens
    reformer-plot lsh.json full.json local.json --out positions.png   # `reformer-eval` results: loss by position

Records a resume superseded (steps after the checkpoint it went back to) are dropped.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from reformer_dist import console
from reformer_dist.evaluate.report import LM_FORMAT, plot_positions, read_results
from reformer_dist.exit_codes import ExitCode
from reformer_dist.ondisk import METRICS
from reformer_dist.training.metrics import read_records

log = logging.getLogger("reformer_dist.cli.plot")  # not __name__: "__main__" under `python -m`


def _smooth(values: list[float], window: int) -> list[float]:
    if window <= 1:
        return values
    out, acc, q = [], 0.0, []
    for v in values:
        q.append(v)
        acc += v
        if len(q) > window:
            acc -= q.pop(0)
        out.append(acc / len(q))
    return out


def _window(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 (1 = no smoothing), got {text!r}")
    return v


def main(argv: list[str] | None = None) -> int:
    console.setup("reformer-plot")
    p = argparse.ArgumentParser(prog="reformer-plot", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "runs",
        nargs="+",
        help="run folders (holding metrics.jsonl) or metrics.jsonl files; or "
        "`reformer-eval` JSON results, whose loss by position is overlaid",
    )
    p.add_argument("--out", default="loss.png", help="PNG to write (default loss.png)")
    p.add_argument("--smooth", type=_window, default=1, help="moving average over N train steps (default 1 = raw)")
    p.add_argument("--x", choices=("step", "tokens"), default="step", help="x axis")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    results = [(Path(r).stem, read_results(r)) for r in args.runs]
    if any(res is not None for _, res in results):
        bad = [r for r, (_, res) in zip(args.runs, results) if res is None or res["format"] != LM_FORMAT]
        if bad:
            log.error(
                f"{', '.join(bad)}: not a `reformer-eval` result with loss by position "
                "(runs and eval results do not mix in one plot)"
            )
            return ExitCode.USAGE
        plot_positions([(label, res) for label, res in results if res is not None], args.out, args.title)
        print(f"wrote {args.out}")
        return ExitCode.OK

    import matplotlib  # slow to import: only after the arguments parsed

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    plotted = 0
    for i, run in enumerate(args.runs):
        path = Path(run)
        path = path / METRICS if path.is_dir() else path
        if not path.is_file():
            log.error(f"{path}: no such file")
            return ExitCode.USAGE
        problems: list[str] = []
        recs = read_records(path, problems)
        for problem in problems:  # a damaged line is never skipped silently
            log.warning(problem)
        start = next((r for r in recs if r.get("event") == "start"), {})
        per_step = start.get("tokens_per_step", 1) if args.x == "tokens" else 1
        label = path.parent.name if path.name == METRICS else path.stem
        color = f"C{i % 10}"
        train = [
            (r["step"], r["loss"])
            for r in recs
            if r.get("event") == "step" and isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])
        ]
        if train:
            xs = [s * per_step for s, _ in train]
            ax.plot(
                xs, _smooth([v for _, v in train], args.smooth), color=color, alpha=0.8, lw=1.2, label=f"{label} train"
            )
            plotted += 1
        evals = [r for r in recs if r.get("event") == "eval" and isinstance(r.get("eval_loss"), (int, float))]
        if evals:
            ax.plot(
                [r["step"] * per_step for r in evals],
                [r["eval_loss"] for r in evals],
                "o--",
                color=color,
                ms=5,
                label=f"{label} eval",
            )
            uni = evals[-1].get("unigram_loss")
            if isinstance(uni, (int, float)):
                ax.axhline(uni, color=color, ls=":", lw=1, label=f"{label} unigram baseline")
            plotted += 1
    if not plotted:
        log.error("no step or eval records in " + ", ".join(args.runs))
        return ExitCode.USAGE
    ax.set_xlabel("tokens" if args.x == "tokens" else "optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(args.title or "Reformer training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
