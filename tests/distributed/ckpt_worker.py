"""Real DeepSpeed ZeRO checkpoints of a tiny reversible ReformerLM, for the `reformer-ckpt` tests.

    # 2 gloo ranks: train STEPS steps, save <out>/ckpt/global_step<STEPS>, write the live model's full fp32
    # state dict (rank 0), then train AFTER more steps
    torchrun --nproc_per_node 2 tests/distributed/ckpt_worker.py save --stage 2 --out DIR
    # any number of ranks: load a universal checkpoint (reformer-ckpt reshard output) and train AFTER steps
    torchrun --nproc_per_node 1 tests/distributed/ckpt_worker.py resume --stage 2 --out DIR --load UNIVERSAL_ROOT

Every step uses the same GLOBAL batch whatever the world size (rank r takes rows [r*B, (r+1)*B)) and the
hash seed = step, so a resumed 1-rank run must reproduce the 2-rank losses up to fp32 summation order.
Each rank writes <out>/result_rank<R>.json (world size, stage, losses); tests judge by those files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from reformer_dist import ReformerConfig, ReformerLM
from reformer_dist.model.reformer import shift_labels

TINY = dict(
    vocab_size=61,
    d_model=16,
    n_heads=2,
    d_head=8,
    d_ff=32,
    n_layers=2,
    attn_layers=["lsh", "local"],
    chunk_len=8,
    local_chunk_len=8,
    n_hashes=2,
    axial_pos_shape=[4, 8],
    reversible=True,
)
GLOBAL_BATCH, SEQ = 4, 32


def global_batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, TINY["vocab_size"], (GLOBAL_BATCH, SEQ), generator=g)


def ds_config(stage: int, world: int, offload: bool, universal: bool) -> dict:
    zero: dict = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # really partition even these tiny tensors
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,
        "checkpoint": {"load_universal": universal},
    }


def full_state(engine, stage: int) -> dict[str, torch.Tensor]:
    """The live model's full fp32 weights (ZeRO-3: gathered from every rank's partition)."""
    import deepspeed

    m = engine.module
    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(m.parameters()), modifier_rank=None):
            return {k: v.detach().clone().float() for k, v in m.state_dict().items()}
    return {k: v.detach().clone().float() for k, v in m.state_dict().items()}


def train_step(engine, step: int, rank: int, world: int) -> float:
    ids = global_batch(step)
    per = GLOBAL_BATCH // world
    mine = ids[rank * per : (rank + 1) * per]
    loss = engine(mine, shift_labels(mine), hash_seed=step)
    engine.backward(loss)
    engine.step()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return float(total) / world


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["save", "resume"])
    p.add_argument("--stage", type=int, required=True)
    p.add_argument("--offload", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--load", help="resume: universal checkpoint root (with latest_universal)")
    p.add_argument("--steps", type=int, default=2, help="save: steps before the checkpoint")
    p.add_argument("--after", type=int, default=2, help="steps after the checkpoint / the resume")
    p.add_argument("--local_rank", type=int, default=None)  # appended by the deepspeed launcher
    args = p.parse_args()

    import deepspeed

    from reformer_dist.training.native_ops import skip_unused_ops

    skip_unused_ops()  # as the trainer does: no deepspeed_shm_comm C++ build
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0 if args.mode == "save" else 1234)  # resume starts from other weights: loading must fix them
    model = ReformerLM(ReformerConfig(**TINY))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=ds_config(args.stage, world, args.offload, args.mode == "resume"),
    )
    result: dict = {"rank": rank, "world_size": world, "stage": args.stage, "mode": args.mode, "losses": {}}
    if args.mode == "save":
        for step in range(1, args.steps + 1):
            result["losses"][step] = train_step(engine, step, rank, world)
        tag = f"global_step{args.steps}"
        engine.save_checkpoint(str(out / "ckpt"), tag=tag, client_state={"step": args.steps})
        state = full_state(engine, args.stage)
        if rank == 0:
            torch.save(state, out / "live_state.pt")
            ReformerConfig(**TINY).save(out / "ckpt" / "config.json")  # what consolidate reads without a trainer
        result["saved"] = tag
        first = args.steps + 1
    else:
        load_path, client = engine.load_checkpoint(
            args.load, tag=None, load_module_strict=True, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if load_path is None:
            raise SystemExit(f"rank {rank}: DeepSpeed could not load {args.load}")
        state = full_state(engine, args.stage)
        if rank == 0:
            torch.save(state, out / "resumed_state.pt")
        first = int(client["step"]) + 1
    for step in range(first, first + args.after):
        result["losses"][step] = train_step(engine, step, rank, world)
    (out / f"result_rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
