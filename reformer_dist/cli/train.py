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
preempted (checkpoint saved), 2 bad config/data/checkpoint, 3 stopped after non-finite losses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from reformer_dist.training.config import ConfigError, describe_schema, load_run_config, plan_batches, to_toml

EXIT_USAGE = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="reformer-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="run config TOML (sections [model] [data] [train] [eval] [checkpoint] "
                                    "[logging] [deepspeed] [parallel] [output]); defaults when omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one key (TOML value syntax, bare strings allowed); repeatable")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="auto: newest complete checkpoint of this run (fresh start if none); PATH: a checkpoint "
                        "folder, a checkpoint root, or a `reformer-ckpt reshard` output (resume on another "
                        "number of ranks, same global batch)")
    p.add_argument("--dry-run", action="store_true", help="validate, print the resolved config and DeepSpeed dict, exit")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def _fail(msg: str, code: int = EXIT_USAGE) -> int:
    print(f"reformer-train: error: {msg}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.help_config:
        print(describe_schema())
        return 0
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.getcwd(), ".torch_extensions"))
    try:
        cfg = load_run_config(args.config, args.overrides)
    except ConfigError as e:
        return _fail(str(e))

    from reformer_dist.parallel.env import discover

    try:
        env = discover()
    except ValueError as e:
        return _fail(f"rank discovery: {e}")
    try:
        plan = plan_batches(cfg, env.world_size)
    except ConfigError as e:
        return _fail(str(e))
    sp = cfg.parallel.sequence_parallel_size
    if sp > 1:  # Ulysses shards heads and the sequence: check divisibility before any process group starts
        if cfg.model.n_heads % sp:
            return _fail(f"parallel.sequence_parallel_size: {sp} must divide model.n_heads = {cfg.model.n_heads}")
        mult = cfg.model.pad_multiple()
        if cfg.data.seq_len % sp or cfg.data.seq_len % mult:
            return _fail(f"data.seq_len: {cfg.data.seq_len} must be a multiple of parallel.sequence_parallel_size "
                         f"({sp}) and of the chunk length(s) ({mult}) under sequence parallelism")

    import torch

    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        return _fail("train.device: 'cuda' requested but torch sees no CUDA device")
    on_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())

    from reformer_dist.data.errors import DataError
    from reformer_dist.data.store import TokenStore

    try:
        store = TokenStore.open(cfg.data.path, expect_tokenizer=cfg.data.tokenizer)
    except (DataError, OSError) as e:
        return _fail(f"data.path: {e}")
    if cfg.model.vocab_size < store.vocab_size:
        return _fail(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the data's vocabulary "
                     f"({store.vocab_size}, tokenizer {store.identity}); set model.vocab_size >= {store.vocab_size}")

    from reformer_dist.training.deepspeed_config import build_deepspeed_config

    try:
        ds_config = build_deepspeed_config(cfg, plan, on_cuda)
    except ConfigError as e:
        return _fail(str(e))

    if args.dry_run:
        if env.rank == 0:
            print(to_toml(cfg))
            print("# batch plan:", json.dumps(dataclasses.asdict(plan)))
            print("# deepspeed config:", json.dumps(ds_config, indent=2))
            print(f"# data: {store!r}")
        return 0
    return _train(cfg, plan, ds_config, env, store, args.resume, on_cuda)


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train(cfg, plan, ds_config, env, store, resume, on_cuda) -> int:
    import dataclasses as dc

    import torch

    from reformer_dist.checkpoint.integrity import CheckpointError
    from reformer_dist.data.errors import DataError
    from reformer_dist.parallel.env import export_env

    if env.source == "single" and not os.environ.get("MASTER_PORT"):
        env = dc.replace(env, master_port=_free_port())  # several single-process runs may share a machine
    export_env(env)
    if on_cuda:
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device("cpu")

    from reformer_dist.training.native_ops import prefer_interpreter_ninja, skip_unused_ops

    prefer_interpreter_ninja()  # any op that is built (CPUAdam under offload) is built once per machine
    import deepspeed
    import torch.distributed as dist

    skip_unused_ops()  # deepspeed_shm_comm serves inference only: no C++ build at start

    # A frozen rank must fail the job, not hang it: DeepSpeed creates its own gradient groups later and
    # they take torch's default timeout (30 min), so set that default as well as the world group's.
    from datetime import timedelta

    import torch.distributed.distributed_c10d as c10d

    timeout = timedelta(seconds=cfg.train.dist_timeout_s)
    c10d.default_pg_timeout = timeout
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo", auto_mpi_discovery=False, timeout=timeout)

    from reformer_dist.training.run_lock import RunLock, RunLockedError
    from reformer_dist.training.trainer import Trainer

    code = 1
    lock = RunLock(cfg.run_dir) if env.rank == 0 else None
    try:
        _take_lock(lock)
        trainer = Trainer(cfg, plan, ds_config, env, store, resume, device)
        trainer.setup()
        outcome = trainer.fit()
        code = outcome.exit_code
    except (CheckpointError, DataError, RunLockedError) as e:
        code = _fail(str(e))
    finally:
        if dist.is_initialized():
            # Tear down explicitly: gloo ranks sometimes abort at interpreter exit otherwise.
            try:
                dist.barrier() if code == 0 else None
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a peer may already be gone
                pass
        if lock is not None:
            lock.release()
    return code


def _take_lock(lock) -> None:
    """Rank 0 locks output.dir before anything in it is written; every rank gets the same verdict."""
    import torch.distributed as dist

    from reformer_dist.training.run_lock import RunLockedError

    problem = None
    if lock is not None:
        try:
            note = lock.acquire()
            if note:
                print(f"reformer-train: {note}", file=sys.stderr)
        except (RunLockedError, OSError) as e:
            problem = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise RunLockedError(problem)


if __name__ == "__main__":
    sys.exit(main())
