"""The run config of `reformer-train`: its sections composed, layered defaults -> TOML file -> `--set`.

Each section is a dataclass next to the code that reads it, declared and checked the way
reformer_dist/config_schema.py describes; this module composes them (and holds [train], the run's own
section, read by the trainer, the optimizer and the schedule):

    [model] model/config.py     [data] data/config.py           [parallel] parallel/config.py
    [eval] training/evaluation.py   [checkpoint] training/checkpointing.py   [logging] training/metrics.py
    [deepspeed] training/deepspeed_config.py   [output] training/outputs.py   [train] here

Every unknown key and every bad value raises `ConfigError` naming its dotted key
(``train.lr: expected a positive number (got -1)``, ``model.n_hedas: unknown key``); a section checks
its own fields and the rules among them, this module only the rules that span sections. All of it
happens before any process group starts: `load_run_config` touches no device and no network. The batch
arithmetic (`plan_batches`) resolves the config against a world size.

Relative paths: `deepspeed.config` in a TOML file is relative to that file's folder (the JSONs live
next to the TOMLs); every other path (data.path, output.dir) is relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from reformer_dist.config_schema import (
    ConfigError,
    FieldError,
    Section,
    boolean,
    build_section,
    choice,
    describe,
    fraction,
    int_min,
    is_number,
    nonneg_number,
    opt,
    optional,
    positive_number,
)
from reformer_dist.data.config import DataConfig
from reformer_dist.model.bucket_rules import DOCUMENT_MASKS_REFUSED
from reformer_dist.model.config import ReformerConfig
from reformer_dist.ondisk import CHECKPOINTS_DIR
from reformer_dist.parallel.config import ParallelConfig
from reformer_dist.training.checkpointing import CheckpointConfig
from reformer_dist.training.deepspeed_config import DeepSpeedConfig
from reformer_dist.training.evaluation import EvalConfig
from reformer_dist.training.metrics import LoggingConfig
from reformer_dist.training.outputs import OutputConfig

__all__ = ["BatchPlan", "ConfigError", "RunConfig", "SECTIONS", "load_run_config", "plan_batches", "to_toml"]


def betas(v: Any) -> str | None:
    ok = isinstance(v, list) and len(v) == 2 and all(is_number(b) and 0 <= b < 1 for b in v)
    return None if ok else "expected two numbers in [0, 1), e.g. [0.9, 0.95]"


# ---------------------------------------------------------------------------------------------- the run's own section
def _threads(v: Any) -> str | None:
    """train.threads: "auto" or a positive integer."""
    if v == "auto" or int_min(1)(v) is None:
        return None
    return 'expected "auto" or a positive integer'


@dataclass
class TrainConfig(Section):
    micro_batch: int = opt(1, int_min(1), "sequences per rank per forward/backward")
    grad_accum: int | None = opt(
        None, optional(int_min(1)), "micro-batches per optimizer step (default 1, or derived from global_batch)"
    )
    global_batch: int | None = opt(
        None,
        optional(int_min(1)),
        "sequences per optimizer step over all ranks; must equal micro_batch * grad_accum * data-parallel size",
    )
    max_steps: int = opt(1000, int_min(1), "optimizer steps in the whole run (a resumed run continues up to it)")
    lr: float = opt(3e-4, positive_number, "peak learning rate")
    min_lr_ratio: float = opt(0.1, fraction, "final LR as a fraction of train.lr")
    warmup_steps: int = opt(100, int_min(0), "linear warmup steps from 0")
    decay: str = opt("cosine", choice("cosine", "linear", "constant"), "LR decay after warmup")
    decay_steps: int | None = opt(None, optional(int_min(1)), "step at which decay reaches min_lr (default max_steps)")
    weight_decay: float = opt(0.1, nonneg_number, "AdamW weight decay (not applied to norms, biases, embeddings)")
    betas: list[float] = opt([0.9, 0.95], betas, "AdamW betas")
    eps: float = opt(1e-8, positive_number, "AdamW epsilon")
    grad_clip: float = opt(1.0, nonneg_number, "global gradient-norm clip (0 = off)")
    seed: int = opt(1234, int_min(0), "seed of weights init and of all RNGs")
    max_nonfinite_steps: int = opt(5, int_min(0), "stop after more than this many non-finite steps in a row")
    requeue: bool = opt(True, boolean, "on SIGUSR1 under SLURM, requeue the job after the checkpoint")
    dist_timeout_s: int = opt(600, int_min(10), "collective timeout: a hung rank fails the job after this long")
    device: str = opt("auto", choice("auto", "cpu", "cuda"), "auto = cuda when available")
    threads: int | str = opt(
        "auto",
        _threads,
        'intra-op CPU threads per rank: a number, or "auto" (the default; '
        "$OMP_NUM_THREADS if set, else the fastest of 1..cores / ranks on this node by measured "
        "step time, re-checked as the load changes)",
    )

    def rules(self) -> None:
        if self.decay_steps is not None and self.decay_steps < self.warmup_steps:
            self.fail(
                "decay_steps",
                f"{self.decay_steps} is before the end of warmup (train.warmup_steps = {self.warmup_steps})",
            )


# ---------------------------------------------------------------------------------------------- composition
SECTIONS: dict[str, type] = {
    "model": ReformerConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "deepspeed": DeepSpeedConfig,
    "parallel": ParallelConfig,
    "output": OutputConfig,
}


@dataclass
class RunConfig:
    model: ReformerConfig = field(default_factory=ReformerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    source: str = "defaults"  # where it came from, for messages

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / CHECKPOINTS_DIR


# ---------------------------------------------------------------------------------------------- loading
def parse_override(item: str) -> tuple[str, str, Any]:
    """'section.key=value' -> (section, key, value); value is parsed as TOML, else kept as a string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    dotted, raw = item.split("=", 1)
    dotted = dotted.strip()
    if dotted.count(".") != 1 or not all(dotted.split(".")):
        raise ConfigError(f"--set {item!r}: expected section.key=value (e.g. train.lr=1e-3)")
    section, key = dotted.split(".")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings: --set data.path=/data/enwik8
    if raw.lower() in ("none", "null"):
        value = None  # TOML has no null; this is how an override resets an optional key
    return section, key, value


def load_run_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """defaults -> TOML file -> `--set section.key=value` overrides, every key validated."""
    raw: dict[str, dict[str, Any]] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            text = p.read_text()
        except OSError as e:
            raise ConfigError(f"--config {p}: cannot read ({e.strerror or e})") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML ({e})") from None
        for section, body in data.items():
            if section not in SECTIONS:
                raise ConfigError(f"{section}: unknown section (known: {', '.join(SECTIONS)})")
            if not isinstance(body, dict):
                raise ConfigError(f"{section}: expected a [{section}] table")
            raw[section] = dict(body)
        ds = raw.get("deepspeed", {})
        if isinstance(ds.get("config"), str) and not Path(ds["config"]).is_absolute():
            ds["config"] = str((p.parent / ds["config"]).resolve())
    for item in overrides:
        section, key, value = parse_override(item)
        if section not in SECTIONS:
            raise ConfigError(f"{section}.{key}: unknown section {section!r} (known: {', '.join(SECTIONS)})")
        raw.setdefault(section, {})[key] = value
    return from_dict(raw, source)


def from_dict(d: dict[str, dict[str, Any]], source: str = "dict") -> RunConfig:
    """Build a RunConfig from section tables (e.g. `RunConfig.to_dict()` output); defaults fill the rest."""
    cfg = RunConfig(source=source)
    for section, body in d.items():
        if section not in SECTIONS:
            raise ConfigError(f"{section}: unknown section (known: {', '.join(SECTIONS)})")
        setattr(cfg, section, build_section(SECTIONS[section], section, body))
    check_across_sections(cfg)
    return cfg


def check_across_sections(cfg: RunConfig) -> None:
    """The rules that involve two sections (each section checks its own); no world size needed."""
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"data.seq_len: {cfg.data.seq_len} exceeds the model's maximum length "
            f"{cfg.model.max_seq_len} "
            f"(model.axial_pos_shape = {cfg.model.axial_pos_shape}, their product)"
        )
    p = cfg.parallel
    p.choose_ulysses_size(cfg.model.n_heads)
    chosen = f" [{p.auto_note}]" if p.auto_note else ""
    if cfg.data.document_masking and p.bucket_sharding:
        raise ConfigError(f"data.document_masking: {DOCUMENT_MASKS_REFUSED}{chosen}")
    if p.sequence_parallel_size > 1:
        # sequence.py imports DeepSpeed's sequence layer and the attention kernels: only SP runs load them
        from reformer_dist.parallel.sequence import check_layout

        try:
            check_layout(cfg.model, cfg.data.seq_len, p)
        except ConfigError as e:
            raise ConfigError(f"{e}{chosen}") from None


# ---------------------------------------------------------------------------------------------- batch arithmetic
@dataclass(frozen=True)
class BatchPlan:
    """Batch arithmetic of one run; the DeepSpeed dict is generated from this and nothing else."""

    world_size: int
    sp_size: int
    dp_size: int
    micro_batch: int
    grad_accum: int
    global_batch: int  # sequences per optimizer step = micro_batch * grad_accum * dp_size
    seq_len: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


def plan_batches(cfg: RunConfig, world_size: int) -> BatchPlan:
    """Resolve micro batch x grad accumulation x data-parallel size; errors name the keys involved."""
    sp = cfg.parallel.sequence_parallel_size
    try:
        dp = cfg.parallel.data_parallel_size(world_size)
    except FieldError as e:
        raise e.within("parallel") from None
    t = cfg.train
    per_step = t.micro_batch * dp  # sequences per micro-step over all ranks
    if t.global_batch is None:
        ga = t.grad_accum or 1
    else:
        if t.global_batch % per_step:
            raise ConfigError(
                f"train.global_batch: {t.global_batch} is not a multiple of train.micro_batch * data-parallel size "
                f"= {t.micro_batch} * {dp} = {per_step} (world size {world_size}, sequence_parallel_size {sp})"
            )
        ga = t.global_batch // per_step
        if t.grad_accum is not None and t.grad_accum != ga:
            raise ConfigError(
                f"train.grad_accum: {t.grad_accum} disagrees with train.global_batch = {t.global_batch} = "
                f"micro_batch {t.micro_batch} * grad_accum {ga} * data-parallel size {dp}; set only one of them"
            )
    return BatchPlan(
        world_size=world_size,
        sp_size=sp,
        dp_size=dp,
        micro_batch=t.micro_batch,
        grad_accum=ga,
        global_batch=per_step * ga,
        seq_len=cfg.data.seq_len,
    )


# ---------------------------------------------------------------------------------------------- writing
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic strings
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: RunConfig) -> str:
    """The resolved config as TOML that `--config` accepts again (keys whose value is none are left out)."""
    lines = [f"# resolved run config (from {cfg.source}); `reformer-train --config` accepts this file"]
    for section, body in cfg.to_dict().items():
        lines.append(f"\n[{section}]")
        for k, v in body.items():
            if v is None:
                lines.append(f"# {k} = none")
            else:
                lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def describe_schema() -> str:
    """Every section and key with its default and doc (for `reformer-train --help-config`)."""
    out = []
    for section, cls in SECTIONS.items():
        out += [f"[{section}]  ({cls.__module__})", *describe(cls)]
    return "\n".join(out)
