"""`reformer-eval`: a trained model's loss on a store split, by hash rounds and by position; synthetic tasks.

    reformer-eval runs/quickstart/model --data builtin --seq-len 512 --n-hashes 1,2,4,8
    reformer-eval runs/x/checkpoints --data data/pg19 --seq-len 4096 --stride 2048 --max-tokens 1000000
    reformer-eval runs/dup/model --data data/dup --task --n-hashes 1,2,4,8,full --out dup.json
    reformer-plot a.json b.json --out positions.png       # several results' loss by position, overlaid

MODEL is a weights folder (`reformer-ckpt consolidate` output, a run's model/) or a checkpoint root/tag.
Writes OUT (JSON) and OUT with .png (loss by position, or the task's accuracy heat map). Exit status: 0,
1 bad input (named: a store tokenised differently from the model, a split too short for one window, a
model that cannot take --seq-len), 2 usage. What each number means: docs/long_context.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from reformer_dist import console
from reformer_dist.cli.args import int_at_least
from reformer_dist.data.errors import DataError
from reformer_dist.exit_codes import ExitCode

log = logging.getLogger("reformer_dist.cli.eval")  # not __name__: "__main__" under `python -m`


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reformer-eval",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("model", help="weights folder (config.json + model.safetensors) or checkpoint root / tag folder")
    p.add_argument("--data", required=True, help="token store folder or 'builtin'")
    p.add_argument("--split", default="validation", choices=("train", "validation"), help="default validation")
    p.add_argument("--seq-len", type=int_at_least(2), help="window length (required without --task)")
    p.add_argument(
        "--stride",
        type=int_at_least(1),
        help="tokens scored per window after the first (default --seq-len: "
        "no overlap; smaller: every token keeps at least seq_len - stride tokens of context)",
    )
    p.add_argument("--start", type=int_at_least(0), default=0, help="token offset of the first window (default 0)")
    p.add_argument(
        "--n-hashes",
        help="hash-round counts, one row each, e.g. 1,2,4,8; 'full' = full attention "
        "in the LSH layers (default: the trained rounds)",
    )
    p.add_argument(
        "--task",
        action="store_true",
        help="score a synthetic task store (reformer-data synth): accuracy on the answers by depth x length",
    )
    p.add_argument(
        "--max-tokens", type=int_at_least(1), help="stop after the window that reaches this many scored tokens"
    )
    p.add_argument("--batch-size", type=int_at_least(1), default=1, help="windows (or task examples) per forward")
    p.add_argument(
        "--hash-seed",
        type=int_at_least(0),
        help="LSH rotation seed (default the model's hash_seed, the trainer's evaluation seed)",
    )
    p.add_argument("--tag", help="checkpoint tag under a checkpoint root (default: latest)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--threads", type=int_at_least(1), help="CPU threads (torch.set_num_threads)")
    p.add_argument("--out", help="JSON to write (default: eval.json or task_eval.json); the PNG beside it")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    console.setup("reformer-eval")
    args = _parser().parse_args(argv)
    if not args.task and args.seq_len is None:
        log.error("--seq-len is required (or --task for a synthetic task store)")
        return ExitCode.USAGE
    import torch  # after the arguments parsed: --help stays fast

    from reformer_dist.data.store import TokenStore
    from reformer_dist.evaluate import report
    from reformer_dist.evaluate.lm import evaluate_lm, parse_rounds
    from reformer_dist.evaluate.loading import load_model
    from reformer_dist.evaluate.tasks import evaluate_task

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out or ("task_eval.json" if args.task else "eval.json"))
    try:
        store = TokenStore.open(args.data)  # first: a missing store costs no model load
        loaded = load_model(args.model, device, args.tag)
        rounds = parse_rounds(args.n_hashes, loaded.cfg)
        if args.task:
            res = evaluate_task(
                loaded,
                store,
                split=args.split,
                rounds=rounds,
                hash_seed=args.hash_seed,
                batch_size=args.batch_size,
                device=device,
                progress=not args.no_progress,
            )
            print(report.task_table(res))
        else:
            res = evaluate_lm(
                loaded,
                store,
                args.split,
                args.seq_len,
                stride=args.stride,
                rounds=rounds,
                hash_seed=args.hash_seed,
                batch_size=args.batch_size,
                max_tokens=args.max_tokens,
                start=args.start,
                device=device,
                progress=not args.no_progress,
            )
            print(report.lm_table(res))
    except DataError as e:
        log.error(str(e))
        return ExitCode.FAILED
    report.write_json(res, out)
    written = [str(out)]
    if not args.no_plot:
        png = out.with_suffix(".png")
        if args.task:
            report.plot_task(res, png)
        else:
            report.plot_positions([(Path(res["model"]).name, res)], png)
        written.append(str(png))
    print(f"wrote {', '.join(written)} ({res['seconds']:.1f} s)")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
