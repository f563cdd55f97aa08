"""``reformer-launch``: helpers for launch scripts.

reformer-launch hostfile [--nodelist STR] [--slots N] [--out FILE]   DeepSpeed hostfile from SLURM
reformer-launch env [--format json|shell|text] [--no-mpi]            the DistEnv this process sees
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from reformer_dist import console
from reformer_dist.exit_codes import ExitCode
from reformer_dist.ondisk import atomic_write
from reformer_dist.parallel.env import DistEnv, discover
from reformer_dist.parallel.hostlist import expand_nodelist

log = logging.getLogger("reformer_dist.cli.launch")  # not __name__: "__main__" under `python -m`


def default_slots(environ: Mapping[str, str] | None = None) -> int:
    """GPUs (or tasks) per node: $SLURM_GPUS_ON_NODE, else $SLURM_NTASKS_PER_NODE, else 1."""
    environ = os.environ if environ is None else environ  # looked up now: os.environ may have been replaced
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_NTASKS_PER_NODE"):
        raw = environ.get(name, "").strip()
        if raw:
            if not raw.isdigit() or int(raw) < 1:
                raise ValueError(f"{name}={raw!r}: expected an integer >= 1 (slots per node); pass --slots")
            return int(raw)
    return 1


def hostfile_text(nodelist: str, slots: int, what: str = "SLURM_JOB_NODELIST") -> str:
    """DeepSpeed hostfile contents: one ``host slots=N`` line per node, in SLURM's order (errors name ``what``)."""
    if slots < 1:
        raise ValueError(f"--slots: expected an integer >= 1, got {slots}")
    hosts = expand_nodelist(nodelist, what)
    if not hosts:
        raise ValueError("empty node list (is SLURM_JOB_NODELIST set? pass --nodelist)")
    seen = dict.fromkeys(hosts)  # first occurrence, in order; linear (a list's `in` made it quadratic)
    return "".join(f"{h} slots={slots}\n" for h in seen)


def format_env(env: DistEnv, fmt: str) -> str:
    """Render a DistEnv as one JSON line, ``export`` lines for ``eval``, or ``key=value`` text."""
    if fmt == "json":
        return env.to_json() + "\n"
    fields = {
        "RANK": env.rank,
        "LOCAL_RANK": env.local_rank,
        "WORLD_SIZE": env.world_size,
        "LOCAL_WORLD_SIZE": env.local_world_size,
        "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": env.master_port,
    }
    if fmt == "shell":
        return "".join(f"export {k}={shlex.quote(str(v))}\n" for k, v in fields.items())
    return " ".join(f"{k}={v}" for k, v in fields.items()) + f" source={env.source}\n"


def _cmd_hostfile(args: argparse.Namespace) -> int:
    given = args.nodelist is not None
    nodelist = args.nodelist if given else os.environ.get("SLURM_JOB_NODELIST", "")
    try:
        slots = args.slots if args.slots is not None else default_slots()
        text = hostfile_text(nodelist, slots, "--nodelist" if given else "SLURM_JOB_NODELIST")
    except ValueError as exc:
        log.error(str(exc))
        return ExitCode.USAGE
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, text)
    else:
        sys.stdout.write(text)
    return ExitCode.OK


def _cmd_env(args: argparse.Namespace) -> int:
    try:
        env = discover(use_mpi=not args.no_mpi)
    except ValueError as exc:
        log.error(str(exc))
        return ExitCode.USAGE
    sys.stdout.write(format_env(env, args.format))
    return ExitCode.OK


def build_parser() -> argparse.ArgumentParser:
    """Argument parser with the ``hostfile`` and ``env`` subcommands."""
    p = argparse.ArgumentParser(
        prog="reformer-launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hostfile", help="write a DeepSpeed hostfile for the SLURM allocation")
    h.add_argument("--nodelist", default=None, help="SLURM hostlist (default: $SLURM_JOB_NODELIST)")
    h.add_argument(
        "--slots",
        type=int,
        default=None,
        help="slots per host (default: $SLURM_GPUS_ON_NODE, $SLURM_NTASKS_PER_NODE or 1)",
    )
    h.add_argument("--out", default=None, help="file to write (default: stdout)")
    h.set_defaults(func=_cmd_hostfile)
    e = sub.add_parser("env", help="print the rank/world/master this process discovers")
    e.add_argument("--format", choices=("json", "shell", "text"), default="json")
    e.add_argument("--no-mpi", action="store_true", help="do not try mpi4py")
    e.set_defaults(func=_cmd_env)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``reformer-launch``."""
    args = build_parser().parse_args(argv)
    console.setup(f"reformer-launch {args.command}")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
