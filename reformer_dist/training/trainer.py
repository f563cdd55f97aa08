"""The training loop: `Trainer(...)` sets the run up, `fit` is the loop, `train_step` one optimizer step.

One optimizer step = `grad_accum` micro-batches per rank, each `engine(...)` -> `engine.backward` ->
`engine.step` (DeepSpeed applies the update on the last one). The loop hands everything else to the
module that owns it:

- resume (which checkpoint, does it fit, loading it): training/resume.py
- evaluation and the unigram baseline: training/evaluation.py
- checkpoint saves (collective, atomic commit, pruning): training/checkpointing.py
- optimizer and LR: training/optimizer.py, training/schedule.py (a pure function of the step)
- the final weights folder and the generated sample: training/outputs.py
- collectives (NCCL round trips of host values): parallel/collectives.py; sequence parallelism and the
  SP batch rule: parallel/sequence.py, parallel/config.py
- preemption and Ctrl-C: training/preemption.py; metrics: training/metrics.py

LSH hashes use `model.hash_seed + step` (fresh rotations per step, the same after a resume); evaluation
and the final sample one fixed seed. A non-finite mean loss (all-reduced over ranks and micro-batches
BEFORE the boundary `engine.step`) makes every rank skip that update; more than
`train.max_nonfinite_steps` in a row end the run (exit code 3) without saving those weights: no checkpoint is
written at a step whose loss was not finite, and at the stop `latest` is moved back to the newest checkpoint
whose weights gave a finite loss (`_stop_nonfinite`). SIGUSR1/SIGTERM
checkpoint at the step boundary, requeue (SLURM) and exit 0; Ctrl-C the same with exit 130, and a
second Ctrl-C aborts at once.

This module creates the DeepSpeed engine (`deepspeed.initialize`) and steps it. It is not the only one
that touches DeepSpeed: cli/train.py starts its process group, checkpointing.py and resume.py call the
engine's save and load, outputs.py gathers ZeRO-3 parameters, optimizer.py builds its CPU Adam under
optimizer offload, parallel/sequence.py wraps attention in its sequence layer, native_ops.py switches off
an op training does not use, and checkpoint/consolidate.py and reshard.py use its checkpoint converters.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import signal
import time
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch

from reformer_dist.data.loader import WindowLoader
from reformer_dist.data.store import TokenStore
from reformer_dist.model.reformer import ReformerLM
from reformer_dist.ondisk import DEEPSPEED_CONFIG, LATEST, MODEL_DIR, RUN_CONFIG_TOML, atomic_write, tag_for
from reformer_dist.parallel.collectives import all_reduce_host, barrier, broadcast_object
from reformer_dist.parallel.config import deepspeed_sequences
from reformer_dist.parallel.env import DistEnv, ThreadPlan
from reformer_dist.parallel.sequence import document_inputs, new_sequence_parallel, sequence_parallel_loss
from reformer_dist.training import checkpointing, outputs, resume
from reformer_dist.training.checkpointing import capture_rng, save_checkpoint, seed_all
from reformer_dist.training.config import BatchPlan, RunConfig, to_toml
from reformer_dist.training.deepspeed_config import resolve_precision, uses_optimizer_offload
from reformer_dist.training.evaluation import Evaluator
from reformer_dist.training.metrics import Metrics, memory_gb
from reformer_dist.training.optimizer import make_optimizer, set_lr
from reformer_dist.training.preemption import PreemptionHandler, requeue_slurm_job
from reformer_dist.training.schedule import lr_at
from reformer_dist.training.threads import ThreadTuner, candidates

EXIT_OK, EXIT_NONFINITE, EXIT_INTERRUPTED = 0, 3, 130  # 130 = 128 + SIGINT, what shells report for Ctrl-C


@dataclass
class Outcome:
    exit_code: int
    step: int
    reason: str  # "finished" | "preempted" | "interrupted" | "nonfinite"
    final_eval_loss: float | None = None


class Trainer:
    """Builds the engine, loaders and evaluator of one run (resuming when asked); every rank makes one."""

    def __init__(self, cfg: RunConfig, plan: BatchPlan, ds_config: dict[str, Any], env: DistEnv, store: TokenStore,
                 resume_spec: str | None, device: torch.device, threads: ThreadPlan | None = None):
        self.cfg, self.plan, self.env, self.store, self.device = cfg, plan, env, store, device
        self.rank, self.world, self.main = env.rank, env.world_size, env.rank == 0
        self.dp_rank = env.rank // plan.sp_size
        self.run_dir, self.ckpt_root = cfg.run_dir, cfg.checkpoint_dir
        self.step = self.tokens_seen = self.nonfinite_streak = self.nonfinite_total = 0
        self.last_saved_step = -1
        self.last_loss: float | None = None  # the mean loss of the step just done (None before the first)
        self.spare_pending = False  # an older checkpoint kept until the newest one gives a finite loss

        point = resume.resolve(resume_spec, self.ckpt_root, self.main,
                               owner=self.run_dir if cfg.checkpoint.dir else None)
        ds_config = resume.deepspeed_config_for(point, ds_config)
        # before anything in the run folder is written: a refused resume leaves config.toml and the rest alone
        fit_state = resume.check_fit(point, self._run_record(), self.rank, self.world) if point is not None else None
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resume_spec is None:
                resume.archive_previous_run(self.run_dir, self.ckpt_root)
            atomic_write(self.run_dir / RUN_CONFIG_TOML, to_toml(cfg))
            atomic_write(self.run_dir / DEEPSPEED_CONFIG, json.dumps(ds_config, indent=2) + "\n")
        barrier()

        # Identical initial weights on every rank (DeepSpeed also broadcasts them); per-rank RNG afterwards.
        seed_all(cfg.train.seed)
        model = ReformerLM(cfg.model)
        self.num_parameters = model.num_parameters()
        self.optimizer = make_optimizer(model, cfg.train, device.type == "cuda", uses_optimizer_offload(ds_config),
                                        announce=self.main)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=ds_config)
        self.zero_stage = int(ds_config["zero_optimization"]["stage"])
        self.sp, self.sp_rank = None, 0
        if plan.sp_size > 1:
            self.sp, self.sp_rank, _, _ = new_sequence_parallel(plan.sp_size, cfg.parallel.ulysses_size)
        seed_all(cfg.train.seed + 1 + self.rank)

        self.loader = self._loader(cfg.data.train_split)
        self.evaluator = Evaluator(cfg.eval, cfg.model, lambda: self._loader(cfg.data.eval_split), device, self.sp,
                                   self._documents, byte_level=store.identity == "bytes")
        if point is not None:
            state = resume.load(point, self.engine, self.loader, self._run_record(), self.rank, self.world,
                                cfg.train.seed, abandon_newer_in=None if resume_spec == "auto" else self.ckpt_root,
                                state=fit_state)
            self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
            self.nonfinite_streak, self.nonfinite_total = int(state["nonfinite_streak"]), int(state["nonfinite_total"])
            self.last_saved_step = self.step
            self.evaluator.unigram_loss = state.get("unigram_loss")
        self.batches = iter(self.loader)
        lc = cfg.logging
        self.metrics = Metrics(self.run_dir, self.rank, self.world, cfg.train.max_steps, self.step,
                               tensorboard=lc.tensorboard, progress_bar=lc.progress_bar,
                               rank_files=lc.rank_files, log_every=lc.log_every)
        self.threads = ThreadTuner(candidates(threads.count)) if threads is not None and threads.auto else None
        self._announce(point, resolve_precision(cfg, device.type == "cuda"))

    def _loader(self, split: str) -> WindowLoader:
        p = self.plan
        return WindowLoader(self.store, split=split, seq_len=self.cfg.data.seq_len, micro_batch=p.micro_batch,
                            seed=self.cfg.data.seed, dp_rank=self.dp_rank, dp_size=p.dp_size, sp_rank=self.sp_rank,
                            sp_size=p.sp_size, loop=True)

    def _announce(self, point: resume.ResumePoint | None, precision: str) -> None:
        p = self.plan
        self.metrics.event(
            "start", world_size=self.world, rank=self.rank, dp_size=p.dp_size, sp_size=p.sp_size,
            micro_batch=p.micro_batch, grad_accum=p.grad_accum, global_batch=p.global_batch, seq_len=p.seq_len,
            tokens_per_step=p.tokens_per_step, max_steps=self.cfg.train.max_steps, num_parameters=self.num_parameters,
            zero_stage=self.zero_stage, precision=precision, device=str(self.device), launcher=self.env.source,
            host=platform.node(), resume_step=self.step if point else None,
            resume_from=str(point.path) if point else None, threads=torch.get_num_threads(),
            threads_auto=self.threads is not None, torch=torch.__version__,
            deepspeed=deepspeed.__version__, config=self.cfg.source, ulysses_size=self.cfg.parallel.heads_group_size,
            layout_note=self.cfg.parallel.auto_note)
        self.metrics.print(
            f"reformer-train: {self.num_parameters / 1e6:.2f}M parameters | world {self.world} ({self.env.source}), "
            f"dp {p.dp_size} x sp {p.sp_size} | global batch {p.global_batch} = micro {p.micro_batch} x accum "
            f"{p.grad_accum} x dp {p.dp_size} | {p.tokens_per_step} tokens/step (seq_len {p.seq_len}) | "
            f"ZeRO-{self.zero_stage} {precision} on {self.device.type} | run dir {self.run_dir}")
        if p.sp_size > 1:
            u = self.cfg.parallel.heads_group_size
            layout = (f"sequence parallelism: {p.sp_size} ranks per sequence = Ulysses {u} (heads) x bucket "
                      f"{p.sp_size // u} (LSH's sorted order)")
            note = self.cfg.parallel.auto_note
            self.metrics.print(f"reformer-train: {layout}" + (f"; {note}" if note else ""))
        if point is not None:
            self.metrics.print(f"resumed from {point.path} at step {self.step}"
                               + (f" (skipped incomplete: {', '.join(point.skipped_incomplete)})"
                                  if point.skipped_incomplete else ""))

    # ------------------------------------------------------------------ one step
    def _documents(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's document inputs (parallel.sequence.document_inputs); none without data.document_masking."""
        if not self.cfg.data.document_masking:
            return {}
        return document_inputs(ids, self.store.eod_id, self.cfg.data.reset_positions, self.sp, self.sp_rank)

    def train_step(self) -> dict[str, Any]:
        engine, plan = self.engine, self.plan
        step = self.step + 1
        lr = lr_at(step, self.cfg.train)
        set_lr(self.optimizer, lr)
        hash_seed = self.cfg.model.hash_seed + self.step  # base + global step (steps done so far)
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
                loss, logged = sequence_parallel_loss(engine, ids, labels, position_offset=b["position_offset"],
                                                      sp=self.sp, hash_seed=hash_seed,
                                                      scale_for_data_parallel=True, **docs)
            engine.backward(loss)
            local += logged.double().cpu()
            if micro == plan.grad_accum - 1:
                # Decide before the boundary step, the same way on every rank: the logged losses of all
                # ranks and micro-batches, counted as DeepSpeed counts them (the SP batch rule)
                total = all_reduce_host(local.clone())
                mean_loss = float(total / deepspeed_sequences(plan.grad_accum * plan.dp_size, plan.sp_size))
                self.optimizer.skip_next_step = not math.isfinite(mean_loss)
            engine.step()
        skipped = self.optimizer.skip_next_step or engine.skipped_steps != skipped_before
        self.optimizer.skip_next_step = False
        dt = time.perf_counter() - t0
        self.step = step
        self.tokens_seen += plan.tokens_per_step
        if skipped:
            self.nonfinite_streak += 1
            self.nonfinite_total += 1
        else:
            self.nonfinite_streak = 0
        gn = engine.get_global_grad_norm()
        return {"step": step, "loss": mean_loss, "local_loss": float(local) / plan.grad_accum, "lr": lr,
                "grad_norm": None if gn is None else float(gn), "tokens_per_s": plan.tokens_per_step / dt,
                "step_time_s": dt, "tokens": self.tokens_seen, "skipped": skipped,
                "nonfinite_streak": self.nonfinite_streak, "mem_gb": memory_gb(self.device)}

    def _timed_step(self) -> dict[str, Any]:
        """One train step at the thread count `train.threads = "auto"` picks (training/threads.py)."""
        if self.threads is None:
            return {**self.train_step(), "threads": torch.get_num_threads()}
        count = self.threads.next_count()
        known = len(self.threads.choices)
        rec = self.train_step()
        self.threads.record(rec["step_time_s"])
        if len(self.threads.choices) > known:
            step, chosen, why = self.threads.choices[-1]
            times = {str(c): None if t is None else round(t, 4) for c, t in self.threads.times.items()}
            self.metrics.event("threads", step=step, threads=chosen, reason=why, step_time_s=times)
            shown = ", ".join(f"{c}: {t:.3g} s" for c, t in times.items() if t is not None)
            self.metrics.print(f"step {step}: {chosen} intra-op thread{'s' if chosen > 1 else ''} from now on "
                               f"({why}; step time by threads {shown})")
        return {**rec, "threads": count}

    # ------------------------------------------------------------------ the loop
    def fit(self) -> Outcome:
        cfg = self.cfg
        # Ctrl-C too: checkpoint at the step boundary; a second Ctrl-C aborts at once (default action)
        handler = PreemptionHandler((signal.SIGUSR1, signal.SIGTERM, signal.SIGINT), abort_on_repeat=(signal.SIGINT,),
                                    repeat_notice="\nreformer-train: Ctrl-C: saving a checkpoint at the end of this step "
                                                  "(Ctrl-C again aborts at once)\n").install()
        started = time.time()
        self.engine.train()
        try:
            while self.step < cfg.train.max_steps:
                rec = self._timed_step()
                self.last_loss = rec["loss"]
                self.metrics.step(rec)
                if not rec["skipped"] and self.spare_pending:
                    self._drop_spare()
                if rec["skipped"]:
                    self.metrics.print(f"step {self.step}: non-finite loss ({rec['loss']}), update skipped "
                                       f"({self.nonfinite_streak} in a row, limit {cfg.train.max_nonfinite_steps})")
                if self.nonfinite_streak > cfg.train.max_nonfinite_steps:
                    return self._stop_nonfinite()
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    self.evaluate()
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save()
                if handler.sync():
                    return self._stop_on_signal(handler)
            return self._finish(started)
        finally:
            handler.uninstall()
            self.metrics.close()

    def _stop_nonfinite(self) -> Outcome:
        """Stop after too many non-finite steps. The weights now are those of the last finite step S, and they
        gave the non-finite losses: nothing is saved, and a checkpoint of step >= S is moved aside so that
        `latest` (and `--resume auto`) name the newest checkpoint whose weights gave a finite loss."""
        limit = self.cfg.train.max_nonfinite_steps
        last_finite = self.step - self.nonfinite_streak
        good, moved = (resume.roll_back_to_finite(self.ckpt_root, last_finite) if self.main else (None, None))
        good, moved = broadcast_object((good, moved))
        if good is not None:
            where = (f"`latest` names {self.ckpt_root / tag_for(good)}, the last checkpoint whose weights gave a "
                     f"finite loss (step {good}); lower train.lr (or check the data) and run again with --resume auto")
        else:
            where = ("there is no checkpoint whose weights gave a finite loss; lower train.lr (or check the data) "
                     "and start again")
        msg = (f"stopping: {self.nonfinite_streak} non-finite steps in a row, steps {last_finite + 1}-{self.step} "
               f"(more than train.max_nonfinite_steps = {limit}). None of them was saved: the weights are still those "
               f"of step {last_finite}, which gave these losses. {where[0].upper()}{where[1:]}.")
        if moved:
            msg += f" The checkpoint of step {last_finite} (those weights) was moved to {moved}."
        self.metrics.event("stopped", step=self.step, reason="nonfinite", message=msg, last_good_checkpoint=good)
        self.metrics.print(msg)
        return Outcome(EXIT_NONFINITE, self.step, "nonfinite")

    def _stop_on_signal(self, handler: PreemptionHandler) -> Outcome:
        saved = self.save()
        if handler.signum == signal.SIGINT:  # Ctrl-C: the user stops the run and may continue it
            self.metrics.event("interrupted", step=self.step, signal=handler.signal_name)
            where = (f"checkpoint saved in {self.ckpt_root / tag_for(self.step)}" if saved else
                     f"no checkpoint of this step (its loss was not finite); {self._latest_note()}")
            self.metrics.print(f"interrupted (Ctrl-C) at step {self.step}: {where}; to continue, run the same "
                               f"command with --resume auto")
            return Outcome(EXIT_INTERRUPTED, self.step, "interrupted")
        self.metrics.event("preempted", step=self.step, signal=handler.signal_name)
        self.metrics.print(f"preempted ({handler.signal_name or 'signal on another rank'}) at step {self.step}: "
                           + ("checkpoint saved" if saved else f"not saved (non-finite loss); {self._latest_note()}"))
        # Only SIGUSR1 (sbatch --signal=B:USR1@120, forwarded to every rank) means "time is up, come back";
        # SIGTERM from a plain scancel must end the job.
        if self.cfg.train.requeue and self.main and os.environ.get("SLURM_JOB_ID") and handler.signum == signal.SIGUSR1:
            requeue_slurm_job()
        return Outcome(EXIT_OK, self.step, "preempted")

    def _finish(self, started: float) -> Outcome:
        cfg = self.cfg
        final = self.evaluate().get("eval_loss") if cfg.eval.at_end else None
        if cfg.checkpoint.at_end:
            self.save()
        if cfg.output.save_model:
            self.save_model()
        unigram = self.evaluator.unigram_loss
        self.metrics.event("end", step=self.step, eval_loss=final, unigram_loss=unigram,
                           nonfinite_total=self.nonfinite_total, seconds=round(time.time() - started, 1))
        summary = f"done: step {self.step} in {time.time() - started:.0f} s"
        if final is not None:
            gain = (unigram - final) / math.log(2)
            summary += (f"; eval loss {final:.4f} nats/token vs unigram baseline {unigram:.4f} "
                        f"({abs(gain):.2f} bits/token {'better' if gain >= 0 else 'worse'} than the baseline)")
        self.metrics.print(summary)
        if cfg.output.sample_tokens:
            self.sample()  # last, so the run ends with it
        return Outcome(EXIT_OK, self.step, "finished", final)

    # ------------------------------------------------------------------ evaluation, checkpoints, outputs
    def evaluate(self) -> dict[str, Any]:
        return self.evaluator.evaluate(self.engine, self.step, self.metrics)

    def _run_record(self) -> dict[str, Any]:
        return resume.run_config_record(self.cfg, self.plan, self.world)

    def save(self) -> bool:
        """Checkpoint this step (collective; once per step); see checkpointing.save_checkpoint. A step whose
        loss was not finite is never saved (its weights are those of an earlier step, with a later loader
        position): returns False and says so."""
        if self.last_saved_step == self.step:
            return True
        if self.nonfinite_streak:
            self.metrics.print(f"step {self.step}: no checkpoint: its loss was not finite; {self._latest_note()}")
            return False
        t0 = time.time()
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "world_size": self.world,
                 "nonfinite_streak": self.nonfinite_streak, "nonfinite_total": self.nonfinite_total,
                 "loader": self.loader.state_dict(), "rng": capture_rng(), "unigram_loss": self.evaluator.unigram_loss}
        removed = save_checkpoint(self.engine, self.ckpt_root, self.step, self.rank, self.world, state,
                                  self._run_record(), self.cfg.checkpoint.keep_last, loss=self.last_loss)
        # Until a later step's loss comes out finite, the newest checkpoint's weights are untested: prune kept
        # the one before it (with keep_last = 1), dropped after the next finite step (_drop_spare).
        self.spare_pending = self.cfg.checkpoint.keep_last == 1
        if self.main:
            self.metrics.event("checkpoint", step=self.step, path=str(self.ckpt_root / tag_for(self.step)),
                               seconds=round(time.time() - t0, 3), removed=[p.name for p in removed])
        self.last_saved_step = self.step
        return True

    def _drop_spare(self) -> None:
        """The newest checkpoint's weights just gave a finite loss: the older one kept for safety may go."""
        self.spare_pending = False
        if self.main:
            checkpointing.prune(self.ckpt_root, self.cfg.checkpoint.keep_last, newest_tested=True)

    def _latest_note(self) -> str:
        latest = self.ckpt_root / LATEST
        name = latest.read_text().strip() if latest.is_file() else None
        return f"`latest` names {self.ckpt_root / name}" if name else "there is no earlier checkpoint"

    def save_model(self) -> None:
        out = self.run_dir / MODEL_DIR
        outputs.save_model(self.engine, self.zero_stage, out, self.main, self.store.tokenizer,
                           dataclasses.asdict(self.cfg.data))
        self.metrics.print(f"saved weights to {out} (ReformerLM.from_pretrained)")

    def sample(self) -> str:
        o = self.cfg.output
        text = outputs.sample(self.engine, self.zero_stage, o, self.store.tokenizer, self.device, self.cfg.train.seed,
                              self.evaluator.hash_seed, self.main)
        self.metrics.print(f"--- sample ({o.sample_tokens} tokens, temperature {o.sample_temperature}) ---\n"
                           f"{o.sample_prompt}{text}\n---")
        return text
