"""What `reformer-eval` prints and writes: tables, the JSON result, and the PNG plots (loss by position,
several results overlaid; the task heat map of accuracy by depth x length)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reformer_dist.ondisk import atomic_write

LM_FORMAT = "reformer_dist.eval/1"
TASK_FORMAT = "reformer_dist.task_eval/1"


def _rounds_name(r: Any) -> str:
    return "trained" if r is None else str(r)


def lm_table(res: dict[str, Any]) -> str:
    """The rows (one per round count) and the loss-by-position table, as text."""
    unit = "bits/byte" if res["unit"] == "byte" else "bits/token"
    lines = [
        f"{res['model']} on {res['store']} {res['split']}: {res['windows']} windows of {res['seq_len']} "
        f"(stride {res['stride']}), hash seed {res['hash_seed']}, trained with {res['trained_n_hashes']} rounds",
        f"{'n_hashes':>9} {'loss':>9} {unit:>11} {'perplexity':>11} {'tokens':>10}",
    ]
    for r in res["rows"]:
        lines.append(
            f"{_rounds_name(r['n_hashes']):>9} {r['loss']:9.4f} {r['bits_per_token']:11.4f} "
            f"{r['perplexity']:11.3f} {r['tokens']:10d}"
        )
    lines.append("loss by position (nats; position = tokens of context):")
    names = " ".join(f"{_rounds_name(r['n_hashes']):>9}" for r in res["rows"])
    lines.append(f"{'positions':>15} {'tokens':>10} {names}")
    for i, b in enumerate(res["rows"][0]["by_position"]):
        vals = [r["by_position"][i]["loss"] for r in res["rows"]]
        span = f"{b['lo']}" if b["lo"] == b["hi"] else f"{b['lo']}-{b['hi']}"
        lines.append(
            f"{span:>15} {b['tokens']:10d} " + " ".join("        -" if v is None else f"{v:9.4f}" for v in vals)
        )
    return "\n".join(lines)


def task_table(res: dict[str, Any]) -> str:
    """Accuracy by length x depth, one block per round count, as text."""
    lines = [f"{res['task']}: {res['model']} on {res['store']} (chance {res['chance']:.3f} per answer token)"]
    for row in res["rows"]:
        depths = sorted({c["depth"] for c in row["cells"]}, key=lambda d: -1 if d is None else d)
        lengths = sorted({c["length"] for c in row["cells"]})
        lines.append(
            f"n_hashes {_rounds_name(row['n_hashes'])}: accuracy {row['accuracy']:.4f} "
            "(answer tokens right; exact = examples with every answer token right)"
        )
        head = "copied half" if depths == [None] else " ".join(f"depth {d:<5}" for d in depths)
        lines.append(f"{'length':>8}  {head}")
        for n in lengths:
            cells = {c["depth"]: c for c in row["cells"] if c["length"] == n}
            lines.append(
                f"{n:>8}  "
                + " ".join(
                    f"{cells[d]['accuracy']:.3f}/{cells[d]['exact']:.2f}".ljust(11 if depths != [None] else 11)
                    for d in depths
                )
            )
    return "\n".join(lines)


def write_json(res: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(res, indent=1) + "\n")


def read_results(path: str | Path) -> dict[str, Any] | None:
    """A `reformer-eval` JSON, or None when the file is not one (e.g. a metrics.jsonl)."""
    p = Path(path)
    if p.suffix != ".json" or not p.is_file():
        return None
    try:
        res = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return res if isinstance(res, dict) and res.get("format") in (LM_FORMAT, TASK_FORMAT) else None


def _pyplot():
    import matplotlib  # slow to import: only when a plot is written

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_positions(results: list[tuple[str, dict[str, Any]]], out: str | Path, title: str | None = None) -> None:
    """Loss by position of every row of every (label, result), on one log-x plot."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (label, res) in enumerate(results):
        for j, row in enumerate(res["rows"]):
            pts = [((b["lo"] * b["hi"]) ** 0.5, b["loss"]) for b in row["by_position"] if b["loss"] is not None]
            name = label if len(res["rows"]) == 1 else f"{label} n_hashes {_rounds_name(row['n_hashes'])}"
            ax.plot(
                [x for x, _ in pts],
                [y for _, y in pts],
                "o-",
                color=f"C{(i + j * len(results)) % 10}",
                ms=4,
                lw=1.3,
                label=name,
            )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the window (tokens of context, log-spaced bins)")
    ax.set_ylabel("mean loss (nats)")
    ax.set_title(title or "loss by position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_task(res: dict[str, Any], out: str | Path) -> None:
    """Heat map of accuracy (length x depth), one panel per round count."""
    plt = _pyplot()
    rows = res["rows"]
    fig, axes = plt.subplots(1, len(rows), figsize=(2 + 3.5 * len(rows), 4), squeeze=False, constrained_layout=True)
    for ax, row in zip(axes[0], rows):
        depths = sorted({c["depth"] for c in row["cells"]}, key=lambda d: -1 if d is None else d)
        lengths = sorted({c["length"] for c in row["cells"]})
        grid = [
            [next(c["accuracy"] for c in row["cells"] if c["length"] == n and c["depth"] == d) for d in depths]
            for n in lengths
        ]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for y, line in enumerate(grid):
            for x, v in enumerate(line):
                ax.text(x, y, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
        ax.set_xticks(range(len(depths)), ["copy" if d is None else f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xlabel("depth of the key" if depths != [None] else "")
        ax.set_ylabel("length")
        ax.set_title(f"n_hashes {_rounds_name(row['n_hashes'])}")
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy")
    fig.suptitle(f"{res['task']}: {Path(res['model']).name}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
