"""`reformer-ckpt`: checkpoint tools (no GPU and no process group needed).

    reformer-ckpt consolidate runs/r/checkpoints --out model/ [--tag step_00000300] [--dtype fp32|bf16]
    reformer-ckpt export-hf model/ --out hf/          # then transformers.ReformerModelWithLMHead.from_pretrained("hf/")
    reformer-ckpt import-hf hf/ --out model/          # then ReformerLM.from_pretrained("model/")
    reformer-ckpt reshard runs/r/checkpoints --out universal/ [--to-stage 2]
    reformer-ckpt inspect runs/r/checkpoints          # also: a weights folder, a universal or HF folder

Exit codes: 0 ok, 1 corrupt/incomplete input (the message names the file), 2 usage or unsupported
config/transition (the message names the field). See docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings

from reformer_dist import console
from reformer_dist.cli.args import worker_count
from reformer_dist.exit_codes import ExitCode
from reformer_dist.ondisk import CheckpointError

log = logging.getLogger("reformer_dist.cli.ckpt")  # not __name__: "__main__" under `python -m`


def _shard_size(text: str) -> int:
    """--max-shard-size, parsed before any checkpoint is read (a typo must not cost a long load)."""
    from reformer_dist.checkpoint.writer import parse_size  # imports torch: only when the option is given

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("max shard size: ")) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reformer-ckpt",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("consolidate", help="ZeRO checkpoint (any stage/world size) -> config.json + safetensors")
    c.add_argument("ckpt_dir", help="checkpoint root (with `latest`) or one tag folder")
    c.add_argument("--tag", help="tag folder under CKPT_DIR (default: the one named by `latest`)")
    c.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    c.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="stored weight dtype (default fp32)")
    c.add_argument("--config", help="ReformerConfig JSON (default: the checkpoint's run_config.json / config.json)")
    c.add_argument(
        "--max-shard-size", type=_shard_size, default="5GB", help="split into shards above this size (default 5GB)"
    )

    e = sub.add_parser("export-hf", help="our weights folder -> transformers ReformerModelWithLMHead folder")
    e.add_argument("src", help="folder with config.json + model.safetensors (consolidate / save_pretrained output)")
    e.add_argument("--out", required=True)
    e.add_argument("--max-shard-size", type=_shard_size, default="5GB")
    e.add_argument(
        "--accept-document-masking",
        action="store_true",
        help="export a model trained with data.document_masking / reset_positions although HF Reformer "
        "cannot apply them (refused by default)",
    )

    i = sub.add_parser("import-hf", help="transformers Reformer folder -> our weights folder")
    i.add_argument("src", help="HF folder with config.json + model.safetensors or pytorch_model.bin")
    i.add_argument("--out", required=True)
    i.add_argument("--max-shard-size", type=_shard_size, default="5GB")

    r = sub.add_parser("reshard", help="ZeRO checkpoint -> DeepSpeed universal checkpoint (load with any world size)")
    r.add_argument("ckpt_dir")
    r.add_argument("--tag")
    r.add_argument("--out", required=True, help="universal checkpoint root to create (OUT/<tag>, OUT/latest_universal)")
    r.add_argument(
        "--to-stage",
        type=int,
        choices=(1, 2, 3),
        help="ZeRO stage of the run that will load it (default: the saved stage); unsupported transitions are refused",
    )
    r.add_argument(
        "--workers",
        type=worker_count,
        default=max(1, min(4, (os.cpu_count() or 1) // 2)),
        help="processes for the conversion (1 .. 4 x the cores)",
    )

    n = sub.add_parser("inspect", help="step, ZeRO stage, world size, parameters, dtype, size on disk")
    n.add_argument("path")
    n.add_argument("--tag")
    n.add_argument("--json", action="store_true", help="print JSON instead of a table")

    for s in (c, e, i, r):
        s.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    for s in (c, r, n):
        s.add_argument(
            "--no-verify", dest="verify", action="store_false", help="skip checksum/CRC verification of the input"
        )
    return p


def _run(args: argparse.Namespace) -> dict | str:
    # Each command imports only its own module: torch, deepspeed and transformers load when a command needs them.
    if args.cmd == "consolidate":
        from reformer_dist.checkpoint.consolidate import consolidate

        summary = consolidate(
            args.ckpt_dir,
            args.out,
            tag=args.tag,
            dtype=args.dtype,
            config=args.config,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            verify=args.verify,
        )
        if "tokenizer_note" in summary:  # the weights are fine; reformer-eval/-generate will need --tokenizer
            log.warning(summary["tokenizer_note"])
        return summary
    if args.cmd == "export-hf":
        from reformer_dist.checkpoint.hf_adapter import export_hf

        out, notes = export_hf(
            args.src,
            args.out,
            overwrite=args.overwrite,
            max_shard_size=args.max_shard_size,
            accept_document_masking=args.accept_document_masking,
        )
        for note in notes:
            log.warning(note)
        return {
            "out": str(out),
            "load_with": f"transformers.ReformerModelWithLMHead.from_pretrained({str(out)!r})",
            "warnings": len(notes),
        }
    if args.cmd == "import-hf":
        from reformer_dist.checkpoint.hf_adapter import import_hf

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # printed below instead
            out, notes = import_hf(args.src, args.out, overwrite=args.overwrite, max_shard_size=args.max_shard_size)
        for note in notes:
            log.warning(note)
        return {"out": str(out), "load_with": f"ReformerLM.from_pretrained({str(out)!r})", "warnings": len(notes)}
    if args.cmd == "reshard":
        from reformer_dist.checkpoint.reshard import reshard

        return reshard(
            args.ckpt_dir,
            args.out,
            tag=args.tag,
            to_stage=args.to_stage,
            workers=args.workers,
            overwrite=args.overwrite,
            verify=args.verify,
        )
    if args.cmd == "inspect":
        from reformer_dist.checkpoint.inspect import format_report, inspect_path

        info = inspect_path(args.path, tag=args.tag, verify=args.verify)
        return info if args.json else format_report(info)
    raise AssertionError(args.cmd)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console.setup(f"reformer-ckpt {args.cmd}")
    try:
        # DeepSpeed logs (accelerator detection, zero_to_fp32 progress) go to stdout; keep stdout for the result.
        with contextlib.redirect_stdout(sys.stderr):
            result = _run(args)
    except CheckpointError as e:  # corrupt / incomplete input: names the file
        log.error(str(e))
        return ExitCode.FAILED
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # usage, unsupported config or transition
        log.error(str(e))
        return ExitCode.USAGE
    print(result if isinstance(result, str) else json.dumps(result, indent=2))
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
