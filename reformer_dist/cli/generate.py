"""`reformer-generate`: continue a prompt with a trained model, decoded with the tokenizer it was trained with.

    reformer-generate runs/quickstart/model --prompt "def " --max-new-tokens 200
    reformer-generate final/ --prompt-file chapter.txt --temperature 0.7 --top-k 40 --n-hashes 8 --seed 1
    reformer-generate old_model/ --tokenizer bytes --prompt "x"   # a folder that does not record its tokenizer

Prints the continuation (control characters escaped: a model's bytes never drive the terminal), then
tokens/s on stderr. Generation is cached (the prompt runs once, then O(window) attention work per token).
Exit status: 0, 1 bad input (named), 2 usage.
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

log = logging.getLogger("reformer_dist.cli.generate")  # not __name__: "__main__" under `python -m`


def _temperature(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 (0 = greedy), got {text!r}")
    return v


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reformer-generate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "model", help="weights folder (a run's model/ or `reformer-ckpt consolidate` output) or checkpoint root"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", type=Path, help="file holding the prompt (UTF-8)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=200)
    p.add_argument("--temperature", type=_temperature, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int_at_least(1), default=None)
    p.add_argument("--n-hashes", type=int_at_least(1), default=None, help="LSH rounds (default: the trained ones)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="sampling seed (default 0)")
    p.add_argument(
        "--tokenizer",
        help="'bytes', 'symbols:<V>', a tokenizer folder or a store: needed only when the "
        "model does not record its tokenizer (must match when it does)",
    )
    p.add_argument("--tag", help="checkpoint tag under a checkpoint root")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    console.setup("reformer-generate")
    args = _parser().parse_args(argv)
    if args.prompt_file is not None:
        try:
            prompt = args.prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            log.error(f"{args.prompt_file}: cannot read the prompt ({e})")
            return ExitCode.FAILED
    else:
        prompt = args.prompt
    import torch

    from reformer_dist.evaluate.generate import generate, safe_text
    from reformer_dist.evaluate.loading import load_model

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        loaded = load_model(args.model, device, args.tag)
        tok = loaded.tokenizer(args.tokenizer)
        g = generate(
            loaded,
            tok,
            prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            n_hashes=args.n_hashes,
            seed=args.seed,
            device=device,
        )
    except DataError as e:
        log.error(str(e))
        return ExitCode.FAILED
    print(safe_text(g.text))
    log.info(
        f"{len(g.new_ids)} tokens after a {g.prompt_tokens}-token prompt in {g.seconds:.2f} s: "
        f"{g.tokens_per_s:.1f} tokens/s (cached, {tok.identity})"
    )
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
