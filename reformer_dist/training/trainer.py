"""The training loop: the only module that imports deepspeed and touches the engine.

One optimizer step = `grad_accum` micro-batches per rank, each `engine(...)` -> `engine.backward` ->
`engine.step` (DeepSpeed applies the update on the last one). Around it:

- LR: `schedule.lr_at(step)` set on the optimizer's param groups before the step (no scheduler state).
- LSH hashes: `model.hash_seed + step` (fresh rotations per step, the same after a resume); eval
  uses one fixed seed.
- Non-finite loss: the mean loss over all ranks and micro-batches is all-reduced BEFORE the
  boundary `engine.step`; if it is not finite every rank tells its optimizer to skip the update
  (Adam moments and step count stay untouched), the step is counted, and more than
  `train.max_nonfinite_steps` in a row end the run with a final checkpoint (exit code 3).
- Checkpoints: `engine.save_checkpoint(save_latest=False)` + per-rank trainer state, barrier, then
  rank 0 writes the manifest and moves `latest` (checkpointing.commit), then prunes old ones.
- Preemption: `PreemptionHandler.sync()` at every step boundary -> checkpoint, requeue, exit 0; Ctrl-C
  (SIGINT) the same way with exit 130, and a second Ctrl-C aborts at once.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
import json
import math
import os
import signal
import platform
import random
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from reformer_dist.checkpoint.integrity import CheckpointError
from reformer_dist.model.documents import document_ids, positions_in_document
from reformer_dist.parallel.env import DistEnv
from reformer_dist.training import checkpointing as ckpt
from reformer_dist.training.config import BatchPlan, RunConfig, to_toml
from reformer_dist.training.deepspeed_config import resolve_precision, uses_optimizer_offload
from reformer_dist.training.metrics import Metrics, memory_gb
from reformer_dist.training.schedule import lr_at

EXIT_OK, EXIT_NONFINITE, EXIT_INTERRUPTED = 0, 3, 130  # 130 = 128 + SIGINT, what shells report for Ctrl-C


@dataclass
class Outcome:
    exit_code: int
    step: int
    reason: str  # "finished" | "preempted" | "interrupted" | "nonfinite"
    final_eval_loss: float | None = None


# ---------------------------------------------------------------------------------------------- helpers
def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _skippable(base: type) -> type:
    """`base` optimizer whose next step() can be turned into a no-op (a skipped non-finite step)."""

    class Skippable(base):  # type: ignore[valid-type, misc]
        skip_next_step = False

        def step(self, *args: Any, **kwargs: Any) -> Any:
            if self.skip_next_step:
                return None
            return super().step(*args, **kwargs)

    Skippable.__name__ = Skippable.__qualname__ = f"Skippable{base.__name__}"
    return Skippable


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices; not biases, norms or embeddings (token and axial position)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "emb" in name or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: RunConfig, on_cuda: bool, offload: bool,
                   announce: bool = True) -> torch.optim.Optimizer:
    """AdamW over `param_groups`; DeepSpeedCPUAdam under optimizer offload (`announce`: say when it is compiled)."""
    t = cfg.train
    groups = param_groups(model, t.weight_decay)
    kw = dict(lr=t.lr, betas=tuple(t.betas), eps=t.eps)
    if offload:
        # ZeRO-Offload steps fp32 partitions on the host: DeepSpeed's CPUAdam (JIT-built once, ~35 s).
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        if announce:
            from reformer_dist.training.native_ops import announce_build

            announce_build("cpu_adam", "the host-side Adam of zero_optimization.offload_optimizer")

        return _skippable(DeepSpeedCPUAdam)(groups, adamw_mode=True, **kw)
    # A torch optimizer: no JIT build (FusedAdam costs ~65 s on CPU); fused kernel on CUDA.
    return _skippable(torch.optim.AdamW)(groups, **kw, **({"fused": True} if on_cuda else {"foreach": True}))


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks of a small host tensor (NCCL only reduces device tensors: round-trip)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        if "nccl" in str(dist.get_backend()):
            x = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
            t.copy_(x.cpu())
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _broadcast_object(obj: Any) -> Any:
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


# ---------------------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: RunConfig, plan: BatchPlan, ds_config: dict[str, Any], env: DistEnv, store: Any,
                 resume: str | None, device: torch.device):
        self.cfg, self.plan, self.ds_config, self.env, self.store = cfg, plan, ds_config, env, store
        self.resume_spec, self.device = resume, device
        self.rank, self.world = env.rank, env.world_size
        self.dp_rank = env.rank // plan.sp_size
        self.main = env.rank == 0
        self.step = 0
        self.tokens_seen = 0
        self.nonfinite_streak = 0
        self.nonfinite_total = 0
        self.last_saved_step = -1
        self.last_eval_step = -1
        self.unigram_loss: float | None = None
        self.last_eval: dict[str, Any] | None = None
        self.eval_hash_seed = cfg.eval.hash_seed if cfg.eval.hash_seed is not None else cfg.model.hash_seed

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        import deepspeed

        from reformer_dist import ReformerLM
        from reformer_dist.data.loader import WindowLoader

        cfg = self.cfg
        self.run_dir = cfg.run_dir
        self.ckpt_root = cfg.checkpoint_dir
        resume_point = self._find_resume()
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.resume_spec is None:
                self._archive_previous_run()
            (self.run_dir / "config.toml").write_text(to_toml(cfg))
            (self.run_dir / "deepspeed_config.json").write_text(json.dumps(self.ds_config, indent=2) + "\n")
        _barrier()

        # Identical initial weights on every rank (DeepSpeed also broadcasts them); per-rank RNG afterwards.
        seed_all(cfg.train.seed)
        model = ReformerLM(cfg.model)
        self.num_parameters = model.num_parameters()
        offload = uses_optimizer_offload(self.ds_config)
        self.optimizer = make_optimizer(model, cfg, self.device.type == "cuda", offload, announce=self.main)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=self.ds_config)
        self.zero_stage = int(self.ds_config["zero_optimization"]["stage"])
        self.sp, self.sp_rank = None, 0
        if self.plan.sp_size > 1:
            from reformer_dist.parallel.sequence import new_sequence_parallel

            self.sp, self.sp_rank, dp_rank, _ = new_sequence_parallel(self.plan.sp_size, cfg.parallel.ulysses_size)
            assert dp_rank == self.dp_rank
        seed_all(cfg.train.seed + 1 + self.rank)

        self.loader = WindowLoader(self.store, split=cfg.data.train_split, seq_len=cfg.data.seq_len,
                                   micro_batch=self.plan.micro_batch, seed=cfg.data.seed, dp_rank=self.dp_rank,
                                   dp_size=self.plan.dp_size, sp_rank=self.sp_rank, sp_size=self.plan.sp_size,
                                   loop=True)
        if cfg.eval.every or cfg.eval.at_end:  # without evaluation a store needs no validation split
            self._eval_loader()  # fail now, not at the first evaluation, when the held-out split is too small

        if resume_point is not None:
            self._load(resume_point)
        self.batches = iter(self.loader)

        lc = cfg.logging
        self.metrics = Metrics(self.run_dir, self.rank, self.world, cfg.train.max_steps, self.step,
                               tensorboard=lc.tensorboard, progress_bar=lc.progress_bar,
                               rank_files=lc.rank_files, log_every=lc.log_every)
        precision = resolve_precision(cfg, self.device.type == "cuda")
        self.metrics.event(
            "start", world_size=self.world, rank=self.rank, dp_size=self.plan.dp_size, sp_size=self.plan.sp_size,
            micro_batch=self.plan.micro_batch, grad_accum=self.plan.grad_accum, global_batch=self.plan.global_batch,
            seq_len=self.plan.seq_len, tokens_per_step=self.plan.tokens_per_step, max_steps=cfg.train.max_steps,
            num_parameters=self.num_parameters, zero_stage=self.zero_stage, precision=precision,
            device=str(self.device), launcher=self.env.source, host=platform.node(),
            resume_step=self.step if resume_point else None,
            resume_from=str(resume_point.path) if resume_point else None,
            threads=torch.get_num_threads(), torch=torch.__version__, deepspeed=deepspeed.__version__,
            config=cfg.source)
        p = self.plan
        self.metrics.print(
            f"reformer-train: {self.num_parameters / 1e6:.2f}M parameters | world {self.world} ({self.env.source}), "
            f"dp {p.dp_size} x sp {p.sp_size} | global batch {p.global_batch} = micro {p.micro_batch} x accum {p.grad_accum} x dp "
            f"{p.dp_size} | {p.tokens_per_step} tokens/step (seq_len {p.seq_len}) | ZeRO-{self.zero_stage} {precision} "
            f"on {self.device.type} | run dir {self.run_dir}")
        if resume_point is not None:
            self.metrics.print(f"resumed from {resume_point.path} at step {self.step}"
                               + (f" (skipped incomplete: {', '.join(resume_point.skipped_incomplete)})"
                                  if resume_point.skipped_incomplete else ""))

    def _eval_loader(self) -> Any:
        from reformer_dist.data.loader import WindowLoader

        return WindowLoader(self.store, split=self.cfg.data.eval_split, seq_len=self.cfg.data.seq_len,
                            micro_batch=self.plan.micro_batch, seed=self.cfg.data.seed, dp_rank=self.dp_rank,
                            dp_size=self.plan.dp_size, sp_rank=self.sp_rank, sp_size=self.plan.sp_size, loop=True)

    def _archive_previous_run(self) -> None:
        """A fresh start (no --resume) into a used run dir moves the old artefacts aside instead of mixing them."""
        old = [self.run_dir / n for n in ("metrics.jsonl", "tb", "model", "ranks") if (self.run_dir / n).exists()]
        ckpts = ckpt.list_tags(self.ckpt_root)
        if not old and not ckpts:
            return
        dest = self.run_dir / f"replaced-{_timestamp()}"
        dest.mkdir(parents=True, exist_ok=True)
        for p in old:
            shutil.move(str(p), str(dest / p.name))
        if ckpts:
            shutil.move(str(self.ckpt_root), str(dest / "checkpoints"))
        print(f"reformer-train: fresh start (no --resume): moved the previous run's files to {dest}", file=sys.stderr)

    # ------------------------------------------------------------------ resume
    def _find_resume(self) -> ckpt.ResumePoint | None:
        """Rank 0 resolves and verifies; every rank gets the same answer (or the same error)."""
        if self.resume_spec is None:
            return None
        uni = Path(self.resume_spec) / "latest_universal"
        if self.resume_spec != "auto" and uni.is_file():  # `reformer-ckpt reshard` output: any world size
            tag = uni.read_text().strip()
            state = ckpt.load_rank_state(uni.parent / tag, 0)
            self.universal = True
            self.ds_config["checkpoint"] = {**self.ds_config.get("checkpoint", {}), "load_universal": True}
            return ckpt.ResumePoint(uni.parent, tag, int(state["step"]), [])
        answer: Any = None
        if self.main:
            try:
                answer = ckpt.find_resume(self.resume_spec, self.ckpt_root)
            except CheckpointError as e:
                answer = e
        answer = _broadcast_object(answer)
        if isinstance(answer, Exception):
            raise CheckpointError(str(answer))
        if answer is None and self.main:
            print(f"reformer-train: --resume {self.resume_spec}: no complete checkpoint in {self.ckpt_root}; "
                  "starting fresh", file=sys.stderr)
        return answer

    def _load(self, point: ckpt.ResumePoint) -> None:
        if getattr(self, "universal", False):
            return self._load_universal(point)
        saved = ckpt.read_run_config(point.path)
        errors, warnings = ckpt.compare_run_configs(saved, self._run_config_record())
        if errors:
            raise CheckpointError(f"{point.path / ckpt.RUN_CONFIG}: checkpoint does not fit this run:\n  "
                                  + "\n  ".join(errors))
        if warnings and self.main:
            print("reformer-train: resuming with a changed config (losses will differ from an uninterrupted run):\n  "
                  + "\n  ".join(warnings), file=sys.stderr)
        state = ckpt.load_rank_state(point.path, self.rank)
        if state.get("world_size") != self.world:
            raise CheckpointError(f"{ckpt.state_path(point.path, self.rank)}: saved with world size "
                                  f"{state.get('world_size')}, this run has {self.world}")
        self._restore(point, state)
        ckpt.restore_rng(state["rng"])
        if self.main and self.resume_spec not in (None, "auto"):
            self._abandon_newer_than(point.step)
        _barrier()

    def _restore(self, point: ckpt.ResumePoint, state: dict[str, Any]) -> None:
        """Engine state (DeepSpeed; universal when enabled in the config) + step, loader and counters."""
        load_path, _ = self.engine.load_checkpoint(str(point.root), tag=point.tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        if load_path is None:
            raise CheckpointError(f"{point.path}: DeepSpeed could not load this checkpoint")
        self.loader.load_state_dict(state["loader"])
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.nonfinite_streak, self.nonfinite_total = int(state["nonfinite_streak"]), int(state["nonfinite_total"])
        self.last_saved_step = self.last_eval_step = self.step
        self.unigram_loss = state.get("unigram_loss")

    def _load_universal(self, point: ckpt.ResumePoint) -> None:
        """Resume a resharded (universal) checkpoint on a different world size.

        The model must match and the global batch must be the same (so the data order is); the
        data-parallel layout may differ. Rank 0's loader position is global, so every rank continues
        from it; per-rank RNG streams restart from seed + step (only dropout masks depend on them).
        """
        saved = ckpt.read_run_config(point.path)
        errors, warnings = ckpt.compare_run_configs(saved, self._run_config_record())
        errors = [e for e in errors if not e.startswith("batch plan")]
        if saved["plan"].get("global_batch") != self.plan.global_batch:
            errors.append(f"batch plan global_batch: checkpoint has {saved['plan'].get('global_batch')}, this run "
                          f"{self.plan.global_batch} (set train.global_batch to keep the same data order)")
        if saved["plan"].get("sp_size", 1) != self.plan.sp_size:
            errors.append("parallel.sequence_parallel_size must stay the same across a reshard")
        if errors:
            raise CheckpointError(f"{point.path / ckpt.RUN_CONFIG}: checkpoint does not fit this run:\n  "
                                  + "\n  ".join(errors))
        if warnings and self.main:
            print("reformer-train: resuming with a changed config:\n  " + "\n  ".join(warnings), file=sys.stderr)
        self._restore(point, ckpt.load_rank_state(point.path, 0))
        seed_all(self.cfg.train.seed + 1 + self.rank + 1000003 * self.step)
        _barrier()

    def _abandon_newer_than(self, step: int) -> None:
        """Resuming from an older checkpoint: move newer ones aside so `--resume auto` never returns to them."""
        newer = [p for s, p in ckpt.list_tags(self.ckpt_root) if s > step]
        if not newer:
            return
        dest = self.ckpt_root / f"abandoned-{_timestamp()}"
        dest.mkdir(parents=True, exist_ok=True)
        for p in newer:
            shutil.move(str(p), str(dest / p.name))
        print(f"reformer-train: moved {len(newer)} newer checkpoint(s) to {dest}", file=sys.stderr)

    def _run_config_record(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "plan": dataclasses.asdict(self.plan), "world_size": self.world}

    # ------------------------------------------------------------------ checkpoint
    def save(self) -> None:
        """Every rank calls this at the same step; `latest` moves only after all ranks finished.

        A failed write on any rank (a full disk) removes the partial folder on every rank's behalf and
        raises CheckpointError naming it and the cause; `latest` and the previous checkpoint stay.
        """
        if self.last_saved_step == self.step:
            return
        tag = ckpt.tag_for(self.step)
        path = self.ckpt_root / tag
        if self.main and path.exists():
            shutil.rmtree(path)  # a stale folder of an abandoned continuation: never mix files
        _barrier()
        t0 = time.time()
        failure: BaseException | None = None
        try:
            self.engine.save_checkpoint(str(self.ckpt_root), tag=tag, save_latest=False,
                                        client_state={"reformer_dist_step": self.step})
            ckpt.save_rank_state(path, self.rank, {
                "step": self.step, "tokens_seen": self.tokens_seen, "world_size": self.world,
                "nonfinite_streak": self.nonfinite_streak, "nonfinite_total": self.nonfinite_total,
                "loader": self.loader.state_dict(), "rng": ckpt.capture_rng(), "unigram_loss": self.unigram_loss,
            })
            if self.main:
                (path / ckpt.RUN_CONFIG).write_text(json.dumps(self._run_config_record(), indent=2) + "\n")
        except (OSError, RuntimeError) as e:  # torch reports a short write as RuntimeError("... unexpected pos ...")
            failure = e
        self._check_saved(path, failure)  # collective: every rank's files are on disk, or all raise
        if self.main:
            try:
                ckpt.commit(self.ckpt_root, tag, extra={"step": self.step, "world_size": self.world})
            except OSError as e:
                failure = e
        self._check_saved(path, failure if self.main else None)
        if self.main:
            removed = ckpt.prune(self.ckpt_root, self.cfg.checkpoint.keep_last)
            self.metrics.event("checkpoint", step=self.step, path=str(path), seconds=round(time.time() - t0, 3),
                               removed=[p.name for p in removed])
        _barrier()  # nobody runs ahead (or exits) before `latest` moved
        self.last_saved_step = self.step

    def _check_saved(self, path: Path, failure: BaseException | None) -> None:
        """All ranks agree whether a save step failed anywhere; if so the partial folder goes and all raise."""
        flag = _all_reduce_sum(torch.tensor([1.0 if failure is not None else 0.0], dtype=torch.float64))
        if not flag.item():
            return
        if self.main:
            shutil.rmtree(path, ignore_errors=True)
        _barrier()
        raise CheckpointError(ckpt.save_failure_message(path, failure, self.rank))

    # ------------------------------------------------------------------ documents
    def _documents(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """``document_ids`` (the whole window's, attention sees all of it) and, with data.reset_positions, this
        rank's ``positions`` for the model; empty without data.document_masking."""
        if not self.cfg.data.document_masking:
            return {}
        window = ids
        if self.sp is not None:  # the SP ranks hold consecutive slices of one window: gather the token ids
            import torch.distributed as dist

            parts = [torch.empty_like(ids) for _ in range(self.sp.size)]
            dist.all_gather(parts, ids.contiguous(), group=self.sp.group)
            window = torch.cat(parts, dim=1)
        docs = document_ids(window, self.store.eod_id)
        out = {"document_ids": docs}
        if self.cfg.data.reset_positions:
            n = ids.shape[1]
            out["positions"] = positions_in_document(docs)[:, self.sp_rank * n : (self.sp_rank + 1) * n]
        return out

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.last_eval_step == self.step and self.last_eval is not None:
            return self.last_eval
        engine = self.engine
        engine.eval()
        vocab = self.cfg.model.vocab_size
        total = torch.zeros(2, dtype=torch.float64)  # loss sum, token count
        hist = torch.zeros(vocab, dtype=torch.float64) if self.unigram_loss is None else None
        # eval.n_hashes: the same windows again with that many rounds (the trained rounds plus new ones)
        want = self.cfg.eval.n_hashes
        rounds = want if want not in (None, self.cfg.model.n_hashes) else None  # equal: one pass gives both
        more = torch.zeros(2, dtype=torch.float64)
        passes = [(None, total)] + ([(rounds, more)] if rounds else [])
        batches = iter(self._eval_loader())  # a fresh loader: the same windows at every evaluation
        for _ in range(self.cfg.eval.batches):
            b = next(batches)
            ids, labels = b["input_ids"].to(self.device), b["labels"].to(self.device)
            docs = self._documents(ids)
            for r, acc in passes:
                loss_sum, count = engine(ids, labels=labels, position_offset=b["position_offset"], n_hashes=r,
                                         hash_seed=self.eval_hash_seed, reduction="sum", sequence_parallel=self.sp,
                                         **docs)
                acc += torch.stack([loss_sum.detach().double().cpu(), count.double().cpu()])
            if hist is not None:
                valid = b["labels"][b["labels"] != -100]
                hist += torch.bincount(valid.flatten(), minlength=vocab).double()
        engine.train()
        _all_reduce_sum(total)
        if rounds:
            _all_reduce_sum(more)
        if hist is not None:
            _all_reduce_sum(hist)
            p = hist[hist > 0] / hist.sum()
            self.unigram_loss = float(-(p * p.log()).sum())
        loss = float(total[0] / total[1].clamp(min=1))
        rec = {"step": self.step, "eval_loss": loss, "bits_per_token": loss / math.log(2),
               "unigram_loss": self.unigram_loss, "eval_tokens": int(total[1])}
        if self.store.identity == "bytes":
            rec["bits_per_byte"] = rec["bits_per_token"]
        extra = ""
        if want is not None:  # eval_loss stays the loss at the trained rounds (model.n_hashes)
            rec["eval_n_hashes"] = want
            rec["eval_loss_n_hashes"] = float(more[0] / more[1].clamp(min=1)) if rounds else loss
            extra = (f" | loss with {want} hash rounds {rec['eval_loss_n_hashes']:.4f} "
                     f"(trained with {self.cfg.model.n_hashes})")
        self.metrics.eval(rec)
        unit = "bits/byte" if "bits_per_byte" in rec else "bits/token"
        self.metrics.print(f"eval step {self.step}: loss {loss:.4f} ({rec['bits_per_token']:.3f} {unit}){extra} | "
                           f"unigram baseline {self.unigram_loss:.4f} (entropy of the held-out tokens)")
        self.last_eval_step, self.last_eval = self.step, rec
        return rec

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, Any]:
        engine, plan = self.engine, self.plan
        step = self.step + 1
        lr = lr_at(step, self.cfg.train)
        _set_lr(self.optimizer, lr)
        hash_seed = self.cfg.model.hash_seed + self.step  # base + global step (steps done so far)
        t0 = time.perf_counter()
        local = torch.zeros(1, dtype=torch.float64)
        skipped_before = getattr(engine, "skipped_steps", 0)
        for micro in range(plan.grad_accum):
            b = next(self.batches)
            ids, labels = b["input_ids"].to(self.device), b["labels"].to(self.device)
            docs = self._documents(ids)
            if self.sp is None:
                loss = engine(ids, labels=labels, position_offset=b["position_offset"], hash_seed=hash_seed, **docs)
                logged = loss.detach()
            else:  # each SP rank logs the whole sequence's mean; gradients are scaled for DeepSpeed's averaging
                from reformer_dist.parallel.sequence import sequence_parallel_loss

                loss, logged = sequence_parallel_loss(engine, ids, labels, position_offset=b["position_offset"],
                                                      sp=self.sp, hash_seed=hash_seed,
                                                      scale_for_data_parallel=True, **docs)
            engine.backward(loss)
            local += logged.double().cpu()
            if micro == plan.grad_accum - 1:
                # Decide before the boundary step, the same way on every rank.
                total = _all_reduce_sum(local.clone())
                mean_loss = float(total / (plan.grad_accum * plan.dp_size * plan.sp_size))
                self.optimizer.skip_next_step = not math.isfinite(mean_loss)
            engine.step()
        skipped = self.optimizer.skip_next_step or getattr(engine, "skipped_steps", 0) != skipped_before
        self.optimizer.skip_next_step = False
        dt = time.perf_counter() - t0
        self.step = step
        self.tokens_seen += plan.tokens_per_step
        if skipped:
            self.nonfinite_streak += 1
            self.nonfinite_total += 1
        else:
            self.nonfinite_streak = 0
        gn = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
        gn = float(gn) if gn is not None else None
        return {"step": step, "loss": mean_loss, "local_loss": float(local) / plan.grad_accum, "lr": lr,
                "grad_norm": gn, "tokens_per_s": plan.tokens_per_step / dt, "step_time_s": dt,
                "tokens": self.tokens_seen, "skipped": skipped, "nonfinite_streak": self.nonfinite_streak,
                "mem_gb": memory_gb(self.device)}

    # ------------------------------------------------------------------ the loop
    def fit(self) -> Outcome:
        from reformer_dist.training.preemption import PreemptionHandler, requeue_slurm_job

        cfg = self.cfg
        # Ctrl-C too: checkpoint at the step boundary; a second Ctrl-C aborts at once (default action)
        handler = PreemptionHandler((signal.SIGUSR1, signal.SIGTERM, signal.SIGINT), abort_on_repeat=(signal.SIGINT,),
                                    repeat_notice="\nreformer-train: Ctrl-C: saving a checkpoint at the end of this step "
                                                  "(Ctrl-C again aborts at once)\n").install()
        self.t_start = time.time()
        self.engine.train()
        try:
            while self.step < cfg.train.max_steps:
                rec = self.train_step()
                self.metrics.step(rec)
                if rec["skipped"]:
                    self.metrics.print(f"step {self.step}: non-finite loss ({rec['loss']}), update skipped "
                                       f"({self.nonfinite_streak} in a row, limit {cfg.train.max_nonfinite_steps})")
                if self.nonfinite_streak > cfg.train.max_nonfinite_steps:
                    msg = (f"stopping: {self.nonfinite_streak} non-finite steps in a row (more than "
                           f"train.max_nonfinite_steps = {cfg.train.max_nonfinite_steps}); the weights are those of "
                           f"step {self.step - self.nonfinite_streak}. Lower train.lr or check the data.")
                    self.save()
                    self.metrics.event("stopped", step=self.step, reason="nonfinite", message=msg)
                    self.metrics.print(msg)
                    return Outcome(EXIT_NONFINITE, self.step, "nonfinite")
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    self.evaluate()
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save()
                if handler.sync():
                    self.save()
                    if handler.signum == signal.SIGINT:  # Ctrl-C: the user stops the run and may continue it
                        self.metrics.event("interrupted", step=self.step, signal=handler.signal_name)
                        self.metrics.print(f"interrupted (Ctrl-C) at step {self.step}: checkpoint saved in "
                                           f"{self.ckpt_root / ckpt.tag_for(self.step)}; to continue, run the same "
                                           f"command with --resume auto")
                        return Outcome(EXIT_INTERRUPTED, self.step, "interrupted")
                    self.metrics.event("preempted", step=self.step, signal=handler.signal_name)
                    self.metrics.print(f"preempted ({handler.signal_name or 'signal on another rank'}) at step "
                                       f"{self.step}: checkpoint saved")
                    # Only SIGUSR1 (sbatch --signal=B:USR1@120, forwarded to every rank) means "time is up,
                    # come back"; SIGTERM from a plain scancel must end the job.
                    if (cfg.train.requeue and self.main and os.environ.get("SLURM_JOB_ID")
                            and handler.signum == signal.SIGUSR1):
                        requeue_slurm_job()
                    return Outcome(EXIT_OK, self.step, "preempted")
            final = self.evaluate().get("eval_loss") if cfg.eval.at_end else None
            if cfg.checkpoint.at_end:
                self.save()
            if cfg.output.save_model:
                self.save_model()
            self.metrics.event("end", step=self.step, eval_loss=final, unigram_loss=self.unigram_loss,
                               nonfinite_total=self.nonfinite_total, seconds=round(time.time() - self.t_start, 1))
            summary = f"done: step {self.step} in {time.time() - self.t_start:.0f} s"
            if final is not None:
                gain = (self.unigram_loss - final) / math.log(2)
                summary += (f"; eval loss {final:.4f} nats/token vs unigram baseline {self.unigram_loss:.4f} "
                            f"({abs(gain):.2f} bits/token {'better' if gain >= 0 else 'worse'} than the baseline)")
            self.metrics.print(summary)
            if cfg.output.sample_tokens:
                self.sample()  # last, so the run ends with it
            return Outcome(EXIT_OK, self.step, "finished", final)
        finally:
            handler.uninstall()
            self.metrics.close()

    # ------------------------------------------------------------------ weights and a sample
    def _gathered(self):
        """Context in which every rank sees full parameters (ZeRO-3 gathers them; a no-op otherwise)."""
        import contextlib

        import deepspeed

        if self.zero_stage == 3:
            return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def save_model(self) -> None:
        out = self.run_dir / "model"
        with self._gathered():
            if self.main:
                self.engine.module.save_pretrained(out)
        _barrier()
        self.metrics.print(f"saved weights to {out} (ReformerLM.from_pretrained)")

    @torch.no_grad()
    def sample(self) -> str:
        o = self.cfg.output
        tok = self.store.tokenizer
        prompt = tok.encode(o.sample_prompt) or [tok.eod_id]
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        model = self.engine.module
        model.eval()
        text = ""
        # ZeRO-3: every rank must run the same forwards (each gathers parameters); otherwise rank 0 alone.
        if self.zero_stage == 3 or self.main:
            gen = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed)
            # the cache holds at most max_seq_len positions; beyond them full recompute slides a window
            fits = len(prompt) + o.sample_tokens - 1 <= self.cfg.model.max_seq_len
            out = model.generate(ids, o.sample_tokens, temperature=o.sample_temperature, top_k=o.sample_top_k,
                                 hash_seed=self.eval_hash_seed, generator=gen, use_cache=fits)
            text = tok.decode(out[0, len(prompt):].tolist())
        model.train()
        _barrier()
        if self.main:
            self.metrics.print(f"--- sample ({o.sample_tokens} tokens, temperature {o.sample_temperature}) ---\n"
                               f"{o.sample_prompt}{text}\n---")
        return text
