"""What a run says about itself: the start record and lines, and the end summary."""

from __future__ import annotations

import logging
import math
import platform

import deepspeed
import torch

from reformer_dist.parallel.env import DistEnv
from reformer_dist.training.config import BatchPlan, RunConfig
from reformer_dist.training.metrics import Metrics
from reformer_dist.training.resume import ResumePoint

log = logging.getLogger(__name__)


def announce_start(
    metrics: Metrics,
    cfg: RunConfig,
    plan: BatchPlan,
    env: DistEnv,
    device: torch.device,
    num_parameters: int,
    zero_stage: int,
    precision: str,
    point: ResumePoint | None,
    step: int,
    threads_auto: bool,
) -> None:
    """The `start` record of metrics.jsonl and the lines the user reads first."""
    p = plan
    metrics.event(
        "start",
        world_size=env.world_size,
        rank=env.rank,
        dp_size=p.dp_size,
        sp_size=p.sp_size,
        micro_batch=p.micro_batch,
        grad_accum=p.grad_accum,
        global_batch=p.global_batch,
        seq_len=p.seq_len,
        tokens_per_step=p.tokens_per_step,
        max_steps=cfg.train.max_steps,
        num_parameters=num_parameters,
        zero_stage=zero_stage,
        precision=precision,
        device=str(device),
        launcher=env.source,
        host=platform.node(),
        resume_step=step if point else None,
        resume_from=str(point.path) if point else None,
        threads=torch.get_num_threads(),
        threads_auto=threads_auto,
        torch=torch.__version__,
        deepspeed=deepspeed.__version__,
        config=cfg.source,
        ulysses_size=cfg.parallel.heads_group_size,
        layout_note=cfg.parallel.auto_note,
    )
    log.info(
        f"{num_parameters / 1e6:.2f}M parameters | world {env.world_size} ({env.source}), dp {p.dp_size} x sp "
        f"{p.sp_size} | global batch {p.global_batch} = micro {p.micro_batch} x accum {p.grad_accum} x dp "
        f"{p.dp_size} | {p.tokens_per_step} tokens/step (seq_len {p.seq_len}) | ZeRO-{zero_stage} {precision} "
        f"on {device.type} | run dir {cfg.run_dir}"
    )
    if p.sp_size > 1:
        u = cfg.parallel.heads_group_size
        note = cfg.parallel.auto_note
        log.info(
            f"sequence parallelism: {p.sp_size} ranks per sequence = Ulysses {u} (heads) x bucket "
            f"{p.sp_size // u} (LSH's sorted order)" + (f"; {note}" if note else "")
        )
    if point is not None:
        skipped = point.skipped_incomplete
        log.info(
            f"resumed from {point.path} at step {step}"
            + (f" (skipped incomplete: {', '.join(skipped)})" if skipped else "")
        )


def end_summary(step: int, seconds: float, eval_loss: float | None, unigram_loss: float | None) -> str:
    """The run's last line: steps, time, and the final evaluation against the unigram baseline."""
    summary = f"done: step {step} in {seconds:.0f} s"
    if eval_loss is not None and unigram_loss is not None:
        gain = (unigram_loss - eval_loss) / math.log(2)
        summary += (
            f"; eval loss {eval_loss:.4f} nats/token vs unigram baseline {unigram_loss:.4f} "
            f"({abs(gain):.2f} bits/token {'better' if gain >= 0 else 'worse'} than the baseline)"
        )
    return summary
