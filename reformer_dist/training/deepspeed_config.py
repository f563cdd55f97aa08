"""Generate the DeepSpeed config dict from the run config: the one place batch arithmetic turns into DeepSpeed keys.

The optional JSON named by `deepspeed.config` holds ZeRO / offload / bf16 details only. Batch keys in it
are accepted only when they agree with the run config (an error names both sides otherwise); optimizer
and scheduler sections are refused because the trainer owns the optimizer and the LR schedule.
No deepspeed import here: this runs (and fails) before any process group exists.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reformer_dist.config_schema import ConfigError, Section, choice, is_int, opt, optional, string
from reformer_dist.parallel.config import deepspeed_sequences

if TYPE_CHECKING:
    from reformer_dist.training.config import BatchPlan, RunConfig

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _zero_stage(v: Any) -> str | None:
    return None if v in (0, 1, 2, 3) and is_int(v) else "expected 0, 1, 2 or 3"


@dataclass
class DeepSpeedConfig(Section):
    config: str | None = opt(
        None, optional(string), "JSON with ZeRO/offload/bf16 options only (no batch, optimizer or scheduler keys)"
    )
    zero_stage: int | None = opt(
        None,
        optional(_zero_stage),
        "ZeRO stage; overrides the JSON's zero_optimization.stage (default: the JSON's, else 1)",
    )
    precision: str = opt("auto", choice("auto", "fp32", "bf16"), "auto = bf16 on CUDA, fp32 on CPU")

    def rules(self) -> None:
        if self.config is not None and not Path(self.config).is_file():
            self.fail("config", f"no such file {self.config}")


REFUSED_KEYS = {
    "optimizer": "the trainer builds the optimizer from [train] (lr, betas, eps, weight_decay)",
    "scheduler": "the LR schedule comes from [train] (warmup_steps, decay, min_lr_ratio)",
    "fp16": 'fp16 is not supported; use deepspeed.precision = "bf16" or "fp32"',
    "sequence_parallel_size": "set parallel.sequence_parallel_size in the run config",
}


def load_json(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except OSError as e:
        raise ConfigError(f"deepspeed.config: cannot read {p} ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config: {p} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"deepspeed.config: {p} must hold a JSON object")
    return d


def resolve_precision(cfg: RunConfig, on_cuda: bool) -> str:
    """The compute precision of a run: `deepspeed.precision`, where "auto" is bf16 on CUDA and fp32 on CPU."""
    p = cfg.deepspeed.precision
    return ("bf16" if on_cuda else "fp32") if p == "auto" else p


def build_deepspeed_config(cfg: RunConfig, plan: BatchPlan, on_cuda: bool) -> dict[str, Any]:
    """The dict passed to `deepspeed.initialize(config=...)`."""
    src = cfg.deepspeed.config
    user = load_json(src) if src else {}
    where = f"deepspeed.config ({src})"
    ds: dict[str, Any] = copy.deepcopy(user)

    for key, why in REFUSED_KEYS.items():
        if key in user:
            raise ConfigError(f"{where}: key {key!r} is not allowed: {why}")
    want = {
        "train_batch_size": deepspeed_sequences(plan.global_batch, plan.sp_size),  # the SP batch rule
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
    }
    for key, value in want.items():
        if key in user and user[key] != value:
            raise ConfigError(
                f"{where}: {key} = {user[key]!r} disagrees with the run config ({value}: train.micro_batch="
                f"{plan.micro_batch}, grad_accum={plan.grad_accum}, data-parallel size={plan.dp_size}); "
                f"remove batch keys from the JSON, the run config is their one source"
            )
        ds[key] = value
    if "gradient_clipping" in user and float(user["gradient_clipping"]) != float(cfg.train.grad_clip):
        raise ConfigError(
            f"{where}: gradient_clipping = {user['gradient_clipping']!r} disagrees with "
            f"train.grad_clip = {cfg.train.grad_clip}; set it in the run config only"
        )
    ds["gradient_clipping"] = float(cfg.train.grad_clip)  # explicit: its default changed in 0.19.x

    precision = resolve_precision(cfg, on_cuda)
    bf16 = dict(user.get("bf16", {}))
    if "enabled" in bf16 and bool(bf16["enabled"]) != (precision == "bf16"):
        raise ConfigError(
            f"{where}: bf16.enabled = {bf16['enabled']} disagrees with deepspeed.precision = "
            f"{cfg.deepspeed.precision!r} (resolved to {precision} on {'CUDA' if on_cuda else 'CPU'})"
        )
    bf16["enabled"] = precision == "bf16"
    ds["bf16"] = bf16

    zero = dict(user.get("zero_optimization", {}))
    if cfg.deepspeed.zero_stage is not None:
        zero["stage"] = cfg.deepspeed.zero_stage
    zero.setdefault("stage", 1)
    for off in ("offload_optimizer", "offload_param"):
        if isinstance(zero.get(off), dict) and zero[off].get("device", "none") != "none":
            zero[off].setdefault("pin_memory", on_cuda)  # explicit: its default changed in 0.19.x
    if zero["stage"] < 3 and zero.get("offload_param", {}).get("device", "none") != "none":
        raise ConfigError(f"{where}: zero_optimization.offload_param needs ZeRO stage 3 (stage is {zero['stage']})")
    ds["zero_optimization"] = zero

    # The trainer passes a torch optimizer; ZeRO wraps it. Offload keeps DeepSpeedCPUAdam (see trainer).
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)  # the trainer does its own logging
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    """The ZeRO stage a DeepSpeed dict asks for (0 when it has no `zero_optimization`)."""
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def uses_optimizer_offload(ds: dict[str, Any]) -> bool:
    off = ds.get("zero_optimization", {}).get("offload_optimizer")
    return isinstance(off, dict) and off.get("device", "none") not in ("none", None)
