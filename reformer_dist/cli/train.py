"""`reformer-train`: train a Reformer LM with DeepSpeed ZeRO on one process or many.

    reformer-train --config configs/quickstart.toml                       # CPU, one process, ~3 min
    reformer-train --config configs/enwik8_64k.toml --set train.lr=5e-4 --resume auto
    deepspeed --num_gpus 8 -m reformer_dist.cli.train --config configs/enwik8_64k.toml
    torchrun --nproc_per_node 2 -m reformer_dist.cli.train --config configs/quickstart.toml
    srun python -m reformer_dist.cli.train --config configs/multinode_zero3.toml --resume auto
    reformer-train --config configs/million_1gpu.toml --dry-run             # validate, print, exit

Order of work: parse and validate the whole config (defaults -> file -> --set), discover the ranks,
plan the batches, open the data, generate the DeepSpeed dict -- all before any process group
starts, so a typo fails in a second on every rank with the key's name. Exit codes: 0 finished or
preempted (checkpoint saved), 2 bad config/data/checkpoint (or output.dir in use by another run), 3
stopped after non-finite losses, 130 interrupted by Ctrl-C (checkpoint saved; a second Ctrl-C aborts
at once). Every error case we test is listed in docs/troubleshooting.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from reformer_dist import console
from reformer_dist.data.errors import DataError
from reformer_dist.data.loader import WindowLoader
from reformer_dist.data.store import BUILTIN, TokenStore
from reformer_dist.exit_codes import ExitCode
from reformer_dist.model.memory import GIB, predicted_peak
from reformer_dist.ondisk import CheckpointError
from reformer_dist.parallel.collectives import broadcast_object
from reformer_dist.parallel.env import DistEnv, ThreadPlan, discover, export_env, free_port, intra_op_threads
from reformer_dist.run_lock import RunLock, RunLockedError
from reformer_dist.training.config import (
    BatchPlan,
    ConfigError,
    RunConfig,
    describe_schema,
    load_run_config,
    plan_batches,
    to_toml,
)
from reformer_dist.training.deepspeed_config import build_deepspeed_config
from reformer_dist.training.native_ops import prefer_interpreter_ninja, skip_unused_ops
from reformer_dist.training.resume import precheck_resume_path
from reformer_dist.training.threads import candidates

log = logging.getLogger("reformer_dist.cli.train")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="reformer-train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        help="run config TOML (sections [model] [data] [train] [eval] [checkpoint] "
        "[logging] [deepspeed] [parallel] [output]); defaults when omitted",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one key (TOML value syntax, bare strings allowed); repeatable",
    )
    p.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="auto: newest complete checkpoint of this run (fresh start if none); PATH: a checkpoint "
        "folder, a checkpoint root, or a `reformer-ckpt reshard` output (resume on another "
        "number of ranks, same global batch)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate, print the resolved config, DeepSpeed dict and the predicted peak memory per GPU, exit",
    )
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def _fail(msg: str, code: ExitCode = ExitCode.USAGE) -> int:
    log.error(msg)
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console.setup("reformer-train")
    if args.help_config:
        print(describe_schema())
        return 0
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.getcwd(), ".torch_extensions"))
    try:
        cfg = load_run_config(args.config, args.overrides)
    except ConfigError as e:
        return _fail(str(e))
    if args.resume not in (None, "auto"):
        problem = precheck_resume_path(args.resume)
        if problem:
            return _fail(problem)

    try:
        env = discover()
    except ValueError as e:
        return _fail(f"rank discovery: {e}")
    try:
        plan = plan_batches(cfg, env.world_size)
    except ConfigError as e:
        return _fail(str(e))

    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        return _fail("train.device: 'cuda' requested but torch sees no CUDA device")
    on_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())

    store, missing = None, None
    try:
        store = TokenStore.open(cfg.data.path, expect_tokenizer=cfg.data.tokenizer)
    except (DataError, OSError) as e:
        if not (args.dry_run and cfg.data.path != BUILTIN and not Path(cfg.data.path).exists()):
            return _fail(f"data.path: {e}")
        missing = e  # a dry run may plan a run whose data is not prepared yet: said below, not fatal
    if store is not None:
        if cfg.model.vocab_size < store.vocab_size:
            return _fail(
                f"model.vocab_size: {cfg.model.vocab_size} is smaller than the data's vocabulary "
                f"({store.vocab_size}, tokenizer {store.identity}); "
                f"set model.vocab_size >= {store.vocab_size}"
            )
        problem = check_data_plan(cfg, plan, store)
        if problem:
            return _fail(problem)
    for key, folder in (("output.dir", cfg.run_dir), ("checkpoint.dir", cfg.checkpoint_dir)):
        problem = check_output_folder(key, folder)
        if problem:
            return _fail(problem)

    try:
        ds_config = build_deepspeed_config(cfg, plan, on_cuda)
    except ConfigError as e:
        return _fail(str(e))
    try:
        threads = intra_op_threads(env.local_world_size, cfg.train.threads)
    except ValueError as e:
        return _fail(str(e))

    if args.dry_run:
        if env.rank == 0:
            print(to_toml(cfg))
            print("# batch plan:", json.dumps(dataclasses.asdict(plan)))
            print(
                "# intra-op threads per rank: "
                + (
                    f"auto, one of {candidates(threads.count)} ({threads.why})"
                    if threads.auto
                    else f"{threads.count} ({threads.why})"
                )
            )
            print("# deepspeed config:", json.dumps(ds_config, indent=2))
            print(predicted_memory(cfg, plan, ds_config))
            if store is not None:
                print(f"# data: {store!r}")
            else:
                print(f"# data: NOT CHECKED, {cfg.data.path} does not exist yet")
                log.warning(
                    f"data.path: {missing}. The dry run checked everything else; prepare the store "
                    f"(docs/data.md: reformer-data shard ... --out {cfg.data.path}) before training"
                )
        return 0
    assert store is not None  # only a dry run goes on without its store
    return _train(cfg, plan, ds_config, env, store, args.resume, on_cuda, threads)


def predicted_memory(cfg: RunConfig, plan: BatchPlan, ds_config: dict) -> str:
    """One comment line: the memory model's predicted peak per GPU of a training step of this run."""
    bf16 = bool(ds_config.get("bf16", {}).get("enabled"))
    m = predicted_peak(
        cfg.model,
        cfg.data.seq_len,
        micro_batch=plan.micro_batch,
        compute_bytes=2 if bf16 else 4,
        sequence_parallel=plan.sp_size,
        ulysses=cfg.parallel.heads_group_size,
    )
    return (
        f"# predicted peak per GPU: {m['peak'] / GIB:.1f} GiB = activations {m['activations'] / GIB:.1f} GiB "
        f"({m['per_token']:.0f} B/token x {plan.micro_batch} x {cfg.data.seq_len // plan.sp_size} tokens per GPU, "
        f"{'bf16' if bf16 else 'fp32'} compute, {m['groups']} head group(s)) + {m['constants'] / GIB:.1f} GiB "
        "weights, gradients, Adam and CUDA context (memory model: reformer_dist/model/memory.py)"
    )


def check_data_plan(cfg: RunConfig, plan: BatchPlan, store: TokenStore) -> str | None:
    """Whether each split the run reads holds at least one global micro-batch of windows (None: it does).

    Checked before any process group starts, so a tiny or missing split fails in a second, not after
    DeepSpeed has started. The validation split is needed only when the run evaluates.
    """
    for key, split in (("data.train_split", cfg.data.train_split), ("data.eval_split", cfg.data.eval_split)):
        if key == "data.eval_split" and not cfg.eval.evaluates:
            continue
        try:
            WindowLoader(
                store,
                split=split,
                seq_len=cfg.data.seq_len,
                micro_batch=plan.micro_batch,
                dp_size=plan.dp_size,
                sp_size=plan.sp_size,
            )
        except DataError as e:
            if store.num_tokens(split) == 0 and split == "validation":
                hint = (
                    "the store has no validation split: make one (reformer-data shard --val-fraction / "
                    "--val-input)"
                    + (
                        " or turn evaluation off (eval.every = 0, eval.at_end = false)"
                        if key == "data.eval_split"
                        else ""
                    )
                )
            elif store.num_tokens(split) == 0:
                hint = "the store has no train split: shard a corpus into it (reformer-data shard --input ...)"
            else:
                hint = "lower data.seq_len or train.micro_batch, use fewer data-parallel ranks, or add data" + (
                    ", or turn evaluation off (eval.every = 0, eval.at_end = false)" if key == "data.eval_split" else ""
                )
            return f"{key} = {split!r}: {e}; {hint}"
    return None


def check_output_folder(key: str, folder: Path) -> str | None:
    """Whether the run can create and write `folder` (None: it can); names the key and the obstacle."""
    if folder.exists() and not folder.is_dir():
        return (
            f"{key}: {folder} is a file; expected a folder (the run writes its config, metrics and checkpoints there)"
        )
    first = folder
    while not first.exists():
        first = first.parent
    if not first.is_dir():
        return f"{key}: {folder} cannot be created: {first} is a file"
    if not os.access(first, os.W_OK | os.X_OK):
        return f"{key}: {folder} cannot be written: no write permission on {first}"
    return None


def _train(
    cfg: RunConfig,
    plan: BatchPlan,
    ds_config: dict,
    env: DistEnv,
    store: TokenStore,
    resume: str | None,
    on_cuda: bool,
    threads: ThreadPlan,
) -> int:
    """Start the process group, take the run lock, train; the exit code."""
    if env.source == "single" and not os.environ.get("MASTER_PORT"):
        # several single-process runs may share a machine
        env = dataclasses.replace(env, master_port=free_port("127.0.0.1"))
    export_env(env)
    console.setup("reformer-train", show_info=env.rank == 0)
    if on_cuda:
        threads = threads._replace(auto=False)  # GPU steps: the count hardly matters, and timing it is noise
    torch.set_num_threads(threads.count)
    if env.rank == 0:
        if threads.auto:
            log.info(
                f"intra-op threads per rank: auto, the fastest of {candidates(threads.count)} by measured step "
                f"time, re-checked as the load changes (at most {threads.why}); train.threads or "
                "OMP_NUM_THREADS fixes the count"
            )
        else:
            log.info(
                f"{threads.count} intra-op thread{'s' if threads.count > 1 else ''} per rank ({threads.why}; "
                "train.threads or OMP_NUM_THREADS sets it)"
            )
        busy = _busy_cores(env.local_world_size * threads.count)
        if busy and threads.count > 1 and not threads.auto:
            log.info(
                f"note: {busy}; with other work on these cores, fewer threads are often several times faster "
                '(--set train.threads=1, or "auto", the default)'
            )
    if on_cuda:
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device("cpu")

    prefer_interpreter_ninja()  # any op that is built (CPUAdam under offload) is built once per machine
    # deepspeed (and the trainer, which imports it) load here, not at the top: deepspeed logs its
    # accelerator choice when imported, which a config error or a dry run should not print
    import deepspeed

    from reformer_dist.training.trainer import Trainer

    skip_unused_ops()  # deepspeed_shm_comm serves inference only: no C++ build at start

    # A frozen rank must fail the job, not hang it: DeepSpeed creates its own gradient groups later and
    # they take torch's default timeout (30 min), so set that default as well as the world group's.
    timeout = timedelta(seconds=cfg.train.dist_timeout_s)
    c10d.default_pg_timeout = timeout
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo", auto_mpi_discovery=False, timeout=timeout)

    code: int = ExitCode.FAILED
    locks = _run_locks(cfg) if env.rank == 0 else []
    try:
        _take_locks(locks)
        code = Trainer(cfg, plan, ds_config, env, store, resume, device, threads).fit()
    except (CheckpointError, DataError, RunLockedError) as e:
        code = _fail(str(e))
    except KeyboardInterrupt:  # Ctrl-C before the training loop (which saves a checkpoint itself)
        code = _fail("interrupted (Ctrl-C) before training started; nothing to save", ExitCode.INTERRUPTED)
    finally:
        if dist.is_initialized():
            # Tear down explicitly: gloo ranks sometimes abort at interpreter exit otherwise.
            try:
                dist.barrier() if code == ExitCode.OK else None
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a peer may already be gone
                pass
        for lock in locks:
            lock.release()
    return code


def _busy_cores(wanted: int) -> str | None:
    """A description of the load when other processes already occupy cores this run's threads need."""
    try:
        load, cores = os.getloadavg()[0], len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    if load + wanted <= cores + 0.5:
        return None
    return f"the machine is busy (load average {load:.1f} on {cores} cores, and this run wants {wanted} threads)"


def _run_locks(cfg: RunConfig) -> list[RunLock]:
    """The folders one run must have to itself: output.dir, and the checkpoint root unless it is output.dir."""
    locks = [RunLock(cfg.run_dir)]
    if cfg.checkpoint_dir.resolve() != cfg.run_dir.resolve():
        locks.append(RunLock(cfg.checkpoint_dir, "checkpoint.dir"))
    return locks


def _take_locks(locks: list[RunLock]) -> None:
    """Rank 0 locks output.dir and checkpoint.dir before anything in them is written; every rank gets the
    same verdict. A refused second lock releases the first."""
    problem = None
    try:
        for lock in locks:
            note = lock.acquire()
            if note:
                log.info(note)
    except (RunLockedError, OSError) as e:
        problem = str(e)
        for lock in locks:
            lock.release()
    problem = broadcast_object(problem)
    if problem:
        raise RunLockedError(problem)


if __name__ == "__main__":
    sys.exit(main())
