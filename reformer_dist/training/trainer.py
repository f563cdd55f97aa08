"""The training loop: `Trainer(...)` sets the run up, `fit` is the loop, `train_step` one optimizer step.

One optimizer step = `grad_accum` micro-batches per rank, each `engine(...)` -> `engine.backward` ->
`engine.step` (DeepSpeed applies the update on the last one). The trainer only orchestrates; each rule
has its own module:

- the run's counters, checkpointed: training/train_state.py; seeds and RNG streams: training/seeding.py
- the run folder: training/run_dir.py; resume (which checkpoint, does it fit, loading): training/resume.py
- checkpoint saves (collective, atomic commit, pruning, the spare kept against divergence):
  training/checkpointing.py
- non-finite losses (the agreed skip, the streak, the stop): training/nonfinite.py
- evaluation and the unigram baseline: training/evaluation.py; the start and end lines: training/announce.py
- optimizer and LR: training/optimizer.py, training/schedule.py (a pure function of the step)
- the thread count: training/threads.py; the final weights folder and sample: training/outputs.py
- preemption, Ctrl-C and the SLURM requeue: training/preemption.py; metrics: training/metrics.py
- collectives: parallel/collectives.py; sequence parallelism and the SP batch rule: parallel/sequence.py,
  parallel/config.py

SIGUSR1/SIGTERM checkpoint at the step boundary, requeue (SLURM, SIGUSR1 only) and exit 0; Ctrl-C the same
with exit 130, and a second Ctrl-C aborts at once. This module creates the DeepSpeed engine
(`deepspeed.initialize`) and steps it; checkpointing.py, resume.py and outputs.py call the engine's own
save, load and parameter gathering.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from typing import Any

import deepspeed
import torch

from reformer_dist.console import prog_name
from reformer_dist.data.loader import WindowLoader
from reformer_dist.data.store import TokenStore
from reformer_dist.exit_codes import ExitCode
from reformer_dist.model.reformer import ReformerLM
from reformer_dist.ondisk import MODEL_DIR, tag_for
from reformer_dist.parallel.collectives import barrier
from reformer_dist.parallel.config import rank_layout
from reformer_dist.parallel.env import DistEnv, ThreadPlan
from reformer_dist.parallel.sequence import document_inputs, new_sequence_parallel, sequence_parallel_loss
from reformer_dist.training import nonfinite, outputs, resume
from reformer_dist.training.announce import announce_start, end_summary
from reformer_dist.training.checkpointing import Checkpointer
from reformer_dist.training.config import BatchPlan, RunConfig
from reformer_dist.training.deepspeed_config import resolve_precision, uses_optimizer_offload, zero_stage
from reformer_dist.training.engine import Engine
from reformer_dist.training.evaluation import Evaluator
from reformer_dist.training.metrics import Metrics, memory_gb
from reformer_dist.training.optimizer import make_optimizer, set_lr
from reformer_dist.training.preemption import PreemptionHandler, requeue_slurm_job, should_requeue
from reformer_dist.training.run_dir import prepare_run_dir
from reformer_dist.training.schedule import lr_at
from reformer_dist.training.seeding import rank_seed, seed_all, step_hash_seed
from reformer_dist.training.threads import ThreadTuner, candidates, timed_step
from reformer_dist.training.train_state import TrainState

log = logging.getLogger(__name__)


class Trainer:
    """Builds the engine, loaders and evaluator of one run (resuming when asked); every rank makes one."""

    def __init__(
        self,
        cfg: RunConfig,
        plan: BatchPlan,
        ds_config: dict[str, Any],
        env: DistEnv,
        store: TokenStore,
        resume_spec: str | None,
        device: torch.device,
        threads: ThreadPlan | None = None,
    ):
        self.cfg, self.plan, self.env, self.store, self.device = cfg, plan, env, store, device
        self.main = env.rank == 0
        self.state = TrainState()
        self.last_loss: float | None = None  # the mean loss of the step just done (None before the first)
        ckpt_root = cfg.checkpoint_dir

        point = resume.resolve(resume_spec, ckpt_root, self.main, owner=cfg.run_dir if cfg.checkpoint.dir else None)
        ds_config = resume.deepspeed_config_for(point, ds_config)
        record = resume.run_config_record(cfg, plan, env.world_size)
        # before anything in the run folder is written: a refused resume leaves config.toml and the rest alone
        fit_state = resume.check_fit(point, record, env.rank, env.world_size) if point is not None else None
        if self.main:
            prepare_run_dir(cfg, ds_config, fresh=resume_spec is None)
        barrier()

        seed_all(cfg.train.seed)  # identical initial weights on every rank
        model = ReformerLM(cfg.model)
        self.num_parameters = model.num_parameters()
        self.optimizer = make_optimizer(
            model, cfg.train, device.type == "cuda", uses_optimizer_offload(ds_config), announce=self.main
        )
        self.engine: Engine = deepspeed.initialize(model=model, optimizer=self.optimizer, config=ds_config)[0]
        self.zero_stage = zero_stage(ds_config)
        self.dp_rank, self.sp_rank = rank_layout(env.rank, plan.sp_size)
        self.sp = new_sequence_parallel(plan.sp_size, cfg.parallel.ulysses_size)[0] if plan.sp_size > 1 else None
        seed_all(rank_seed(cfg.train.seed, env.rank))

        self.loader = self._loader(cfg.data.train_split)
        self.evaluator = Evaluator(
            cfg.eval,
            cfg.model,
            lambda: self._loader(cfg.data.eval_split),
            device,
            self.sp,
            self._documents,
            byte_level=store.identity == "bytes",
        )
        if point is not None:
            resume.load(
                point,
                self.engine,
                self.loader,
                self.state,
                record,
                env.rank,
                env.world_size,
                cfg.train.seed,
                abandon_newer_in=None if resume_spec == "auto" else ckpt_root,
                state=fit_state,
            )
        self.checkpointer = Checkpointer(
            self.engine,
            ckpt_root,
            env.rank,
            env.world_size,
            cfg.checkpoint.keep_last,
            record,
            saved_step=self.state.step if point is not None else -1,
        )
        self.batches = iter(self.loader)
        lc = cfg.logging
        self.metrics = Metrics(
            cfg.run_dir,
            env.rank,
            env.world_size,
            cfg.train.max_steps,
            self.state.step,
            tensorboard=lc.tensorboard,
            progress_bar=lc.progress_bar,
            rank_files=lc.rank_files,
            log_every=lc.log_every,
        )
        self.threads = ThreadTuner(candidates(threads.count)) if threads is not None and threads.auto else None
        announce_start(
            self.metrics,
            cfg,
            plan,
            env,
            device,
            self.num_parameters,
            self.zero_stage,
            resolve_precision(cfg, device.type == "cuda"),
            point,
            self.state.step,
            self.threads is not None,
        )

    def _loader(self, split: str) -> WindowLoader:
        p = self.plan
        return WindowLoader(
            self.store,
            split=split,
            seq_len=self.cfg.data.seq_len,
            micro_batch=p.micro_batch,
            seed=self.cfg.data.seed,
            dp_rank=self.dp_rank,
            dp_size=p.dp_size,
            sp_rank=self.sp_rank,
            sp_size=p.sp_size,
            loop=True,
        )

    def _documents(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's document inputs (parallel.sequence.document_inputs); none without data.document_masking."""
        if not self.cfg.data.document_masking:
            return {}
        return document_inputs(ids, self.store.eod_id, self.cfg.data.reset_positions, self.sp, self.sp_rank)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, Any]:
        """One optimizer step on every rank; its record for metrics.jsonl."""
        engine, plan, state = self.engine, self.plan, self.state
        lr = lr_at(state.step + 1, self.cfg.train)
        set_lr(self.optimizer, lr)
        hash_seed = step_hash_seed(self.cfg.model.hash_seed, state.step)
        t0 = time.perf_counter()
        local = torch.zeros(1, dtype=torch.float64)
        skipped_before = engine.skipped_steps
        for micro in range(plan.grad_accum):
            b = next(self.batches)
            ids, labels = b["input_ids"].to(self.device), b["labels"].to(self.device)
            docs = self._documents(ids)
            if self.sp is None:
                loss = engine(ids, labels=labels, position_offset=b["position_offset"], hash_seed=hash_seed, **docs)
                logged = loss.detach()
            else:  # each SP rank logs the whole sequence's mean; gradients are scaled for DeepSpeed's averaging
                loss, logged = sequence_parallel_loss(
                    engine,
                    ids,
                    labels,
                    position_offset=b["position_offset"],
                    sp=self.sp,
                    hash_seed=hash_seed,
                    scale_for_data_parallel=True,
                    **docs,
                )
            engine.backward(loss)
            local += logged.double().cpu()
            if micro == plan.grad_accum - 1:  # decided before the boundary step, the same on every rank
                mean_loss = nonfinite.mean_loss(local, plan)
                self.optimizer.skip_next_step = nonfinite.skip(mean_loss)
            engine.step()
        skipped = self.optimizer.skip_next_step or engine.skipped_steps != skipped_before
        self.optimizer.skip_next_step = False
        dt = time.perf_counter() - t0
        state.step += 1
        state.tokens_seen += plan.tokens_per_step
        nonfinite.count(state, skipped)
        gn = engine.get_global_grad_norm()
        return {
            "step": state.step,
            "loss": mean_loss,
            "local_loss": float(local) / plan.grad_accum,
            "lr": lr,
            "grad_norm": None if gn is None else float(gn),
            "tokens_per_s": plan.tokens_per_step / dt,
            "step_time_s": dt,
            "tokens": state.tokens_seen,
            "skipped": skipped,
            "nonfinite_streak": state.nonfinite_streak,
            "mem_gb": memory_gb(self.device),
        }

    # ------------------------------------------------------------------ the loop
    def fit(self) -> ExitCode:
        """Train to `train.max_steps` (or a stop); the process's exit code."""
        cfg, state = self.cfg, self.state
        # Ctrl-C too: checkpoint at the step boundary; a second Ctrl-C aborts at once (default action)
        handler = PreemptionHandler(
            (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT),
            abort_on_repeat=(signal.SIGINT,),
            repeat_notice=f"\n{prog_name()}: Ctrl-C: saving a checkpoint at the end of this "
            "step (Ctrl-C again aborts at once)\n",
        ).install()
        started = time.time()
        self.engine.train()
        try:
            while state.step < cfg.train.max_steps:
                rec = timed_step(self.threads, self.train_step, self.metrics)
                self.last_loss = rec["loss"]
                self.metrics.step(rec)
                if rec["skipped"]:
                    log.info(nonfinite.skipped_message(state, rec["loss"], cfg.train.max_nonfinite_steps))
                else:
                    self.checkpointer.tested()
                if nonfinite.exceeded(state, cfg.train.max_nonfinite_steps):
                    return self._stop_nonfinite()
                if cfg.eval.every and state.step % cfg.eval.every == 0:
                    self.evaluate()
                if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0:
                    self.save()
                if handler.sync():
                    return self._stop_on_signal(handler)
            return self._finish(started)
        finally:
            handler.uninstall()
            self.metrics.close()

    def _stop_nonfinite(self) -> ExitCode:
        msg, good = nonfinite.stop(self.state, self.cfg.train.max_nonfinite_steps, self.cfg.checkpoint_dir, self.main)
        self.metrics.event("stopped", step=self.state.step, reason="nonfinite", message=msg, last_good_checkpoint=good)
        log.info(msg)
        return ExitCode.NONFINITE

    def _stop_on_signal(self, handler: PreemptionHandler) -> ExitCode:
        step, saved = self.state.step, self.save()
        if handler.signum == signal.SIGINT:  # Ctrl-C: the user stops the run and may continue it
            self.metrics.event("interrupted", step=step, signal=handler.signal_name)
            where = (
                f"checkpoint saved in {self.cfg.checkpoint_dir / tag_for(step)}"
                if saved
                else f"no checkpoint of this step (its loss was not finite); {self.checkpointer.latest_note()}"
            )
            log.info(
                f"interrupted (Ctrl-C) at step {step}: {where}; to continue, run the same command with --resume auto"
            )
            return ExitCode.INTERRUPTED
        self.metrics.event("preempted", step=step, signal=handler.signal_name)
        log.info(
            f"preempted ({handler.signal_name or 'signal on another rank'}) at step {step}: "
            + ("checkpoint saved" if saved else f"not saved (non-finite loss); {self.checkpointer.latest_note()}")
        )
        if should_requeue(self.cfg.train.requeue, handler.signum, self.env.rank):
            requeue_slurm_job()
        return ExitCode.OK

    def _finish(self, started: float) -> ExitCode:
        cfg, state = self.cfg, self.state
        final = self.evaluate().get("eval_loss") if cfg.eval.at_end else None
        if cfg.checkpoint.at_end:
            self.save()
        if cfg.output.save_model:
            self.save_model()
        seconds = time.time() - started
        self.metrics.event(
            "end",
            step=state.step,
            eval_loss=final,
            unigram_loss=state.unigram_loss,
            nonfinite_total=state.nonfinite_total,
            seconds=round(seconds, 1),
        )
        log.info(end_summary(state.step, seconds, final, state.unigram_loss))
        if cfg.output.sample_tokens:
            self.sample()  # last, so the run ends with it
        return ExitCode.OK

    # ------------------------------------------------------------------ evaluation, checkpoints, outputs
    def evaluate(self) -> dict[str, Any]:
        """Evaluate now (collective); see training/evaluation.py."""
        return self.evaluator.evaluate(self.engine, self.state, self.metrics)

    def save(self) -> bool:
        """Checkpoint this step (collective); False when its loss was not finite (see `Checkpointer.save`)."""
        return self.checkpointer.save(self.state, self.loader, self.last_loss, self.metrics)

    def save_model(self) -> None:
        """The final weights folder, <output.dir>/model."""
        out = self.cfg.run_dir / MODEL_DIR
        outputs.save_model(
            self.engine, self.zero_stage, out, self.main, self.store.tokenizer, dataclasses.asdict(self.cfg.data)
        )
        log.info(f"saved weights to {out} (ReformerLM.from_pretrained)")

    def sample(self) -> str:
        """Generate `output.sample_tokens` tokens after `output.sample_prompt` and show them."""
        o = self.cfg.output
        text = outputs.sample(
            self.engine,
            self.zero_stage,
            o,
            self.store.tokenizer,
            self.device,
            self.cfg.train.seed,
            self.evaluator.hash_seed,
            self.main,
        )
        log.info(
            f"--- sample ({o.sample_tokens} tokens, temperature {o.sample_temperature}) ---\n"
            f"{o.sample_prompt}{text}\n---"
        )
        return text
