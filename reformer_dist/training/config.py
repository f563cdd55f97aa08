"""The run config of `reformer-train`: TOML sections, defaults -> file -> `--set` overrides.

Each section is a small dataclass that only its own component reads ([model] is `ReformerConfig`).
Every unknown key and every bad value raises `ConfigError` naming its dotted key
(``train.lr: expected a positive number (got -1)``, ``model.n_hedas: unknown key``), and all of it
happens before any process group starts: `load_run_config` touches no device and no network.

Relative paths: `deepspeed.config` in a TOML file is relative to that file's folder (the JSONs live
next to the TOMLs); every other path (data.path, output.dir) is relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from reformer_dist.model.config import ReformerConfig


class ConfigError(ValueError):
    """A run-config problem; the message starts with the dotted key it is about."""


# ---------------------------------------------------------------------------------------------- checks
# A check takes a value and returns an error description, or None when the value is fine.
Check = Callable[[Any], "str | None"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def int_min(lo: int) -> Check:
    return lambda v: None if _is_int(v) and v >= lo else (
        "expected a positive integer" if lo == 1 else f"expected an integer >= {lo}")


def positive_number(v: Any) -> str | None:
    return None if _is_num(v) and math.isfinite(v) and v > 0 else "expected a positive number"


def nonneg_number(v: Any) -> str | None:
    return None if _is_num(v) and math.isfinite(v) and v >= 0 else "expected a number >= 0"


def fraction(v: Any) -> str | None:
    return None if _is_num(v) and 0 <= v <= 1 else "expected a number in [0, 1]"


def open_fraction(v: Any) -> str | None:
    return None if _is_num(v) and 0 <= v < 1 else "expected a number in [0, 1)"


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "expected true or false"


def string(v: Any) -> str | None:
    return None if isinstance(v, str) and v else "expected a non-empty string"


def any_string(v: Any) -> str | None:
    return None if isinstance(v, str) else "expected a string"


def choice(*options: str) -> Check:
    return lambda v: None if v in options else f"expected one of {list(options)}"


def optional(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


def betas(v: Any) -> str | None:
    ok = isinstance(v, list) and len(v) == 2 and all(_is_num(b) and 0 <= b < 1 for b in v)
    return None if ok else "expected two numbers in [0, 1), e.g. [0.9, 0.95]"


def opt(default: Any, check: Check, doc: str = "") -> Any:
    """A config field: default, check, and a one-line doc (shown by `reformer-train --help-config`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: json.loads(json.dumps(default)), metadata={"check": check, "doc": doc})
    return field(default=default, metadata={"check": check, "doc": doc})


# ---------------------------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    path: str = opt("builtin", string, "token store folder (`reformer-data` prepares one) or 'builtin'")
    tokenizer: str | None = opt(None, optional(string), "refuse a store whose tokenizer differs from this name")
    seq_len: int = opt(1024, int_min(2), "tokens per training window")
    seed: int = opt(0, int_min(0), "window shuffling seed")
    train_split: str = opt("train", choice("train", "validation"), "split trained on")
    eval_split: str = opt("validation", choice("train", "validation"), "held-out split evaluated on")
    document_masking: bool = opt(False, boolean, "a token attends only to tokens of its own document (documents "
                                 "end with the store's end-of-document id; windows pack several)")
    reset_positions: bool = opt(False, boolean, "position embeddings restart at each document (needs "
                                "data.document_masking)")


@dataclass
class TrainConfig:
    micro_batch: int = opt(1, int_min(1), "sequences per rank per forward/backward")
    grad_accum: int | None = opt(None, optional(int_min(1)), "micro-batches per optimizer step (default 1, or derived from global_batch)")
    global_batch: int | None = opt(None, optional(int_min(1)), "sequences per optimizer step over all ranks; must equal micro_batch * grad_accum * data-parallel size")
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
    threads: int | None = opt(None, optional(int_min(1)), "intra-op CPU threads per rank (default: $OMP_NUM_THREADS, "
                              "else this process's cores / ranks on this node)")


@dataclass
class EvalConfig:
    every: int = opt(200, int_min(0), "evaluate every N steps (0 = only at the end)")
    batches: int = opt(8, int_min(1), "micro-batches per rank per evaluation (the same ones every time)")
    at_end: bool = opt(True, boolean, "evaluate after the last step")
    hash_seed: int | None = opt(None, optional(int_min(0)), "fixed LSH hash seed for eval (default model.hash_seed)")
    n_hashes: int | None = opt(None, optional(int_min(1)), "also report the eval loss with this many LSH hash rounds "
                               "(trained rounds kept, new ones added); the loss at model.n_hashes is reported too")


@dataclass
class CheckpointConfig:
    every: int = opt(500, int_min(0), "save every N steps (0 = only at the end)")
    keep_last: int = opt(3, int_min(1), "complete checkpoints kept; older ones are deleted after a new one completes")
    at_end: bool = opt(True, boolean, "save after the last step")
    dir: str | None = opt(None, optional(string), "checkpoint root (default <output.dir>/checkpoints)")


@dataclass
class LoggingConfig:
    log_every: int = opt(1, int_min(1), "write a step record every N steps")
    tensorboard: bool = opt(True, boolean, "TensorBoard scalars under <output.dir>/tb (rank 0)")
    progress_bar: bool = opt(True, boolean, "tqdm bar on rank 0")
    rank_files: bool = opt(False, boolean, "every rank writes its own <output.dir>/ranks/rank<R>.jsonl (tests, debugging)")


@dataclass
class DeepSpeedConfig:
    config: str | None = opt(None, optional(string), "JSON with ZeRO/offload/bf16 options only (no batch, optimizer or scheduler keys)")
    zero_stage: int | None = opt(None, optional(lambda v: None if v in (0, 1, 2, 3) and _is_int(v) else "expected 0, 1, 2 or 3"),
                                 "ZeRO stage; overrides the JSON's zero_optimization.stage (default: the JSON's, else 1)")
    precision: str = opt("auto", choice("auto", "fp32", "bf16"), "auto = bf16 on CUDA, fp32 on CPU")


@dataclass
class ParallelConfig:
    sequence_parallel_size: int = opt(1, int_min(1), "ranks sharing one sequence; divides the world size")
    ulysses_size: int | None = opt(None, optional(int_min(1)), "of those, ranks that shard heads (DeepSpeed-Ulysses; "
                                   "divides model.n_heads); the rest shard LSH's sorted order (bucket sharding). "
                                   "Default: all of them (pure Ulysses)")


@dataclass
class OutputConfig:
    dir: str = opt("runs/default", string, "run folder: resolved config, metrics.jsonl, tb/, checkpoints/, model/")
    save_model: bool = opt(True, boolean, "write the final weights with save_pretrained to <output.dir>/model")
    sample_tokens: int = opt(0, int_min(0), "print a generated sample of this many tokens at the end (0 = none)")
    sample_prompt: str = opt("", any_string, "prompt of the final sample")
    sample_temperature: float = opt(0.8, positive_number, "sampling temperature of the final sample")
    sample_top_k: int | None = opt(None, optional(int_min(1)), "top-k of the final sample")


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
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"


# ---------------------------------------------------------------------------------------------- model section
def _model_type_error(annotation: str, v: Any) -> str | None:
    """Check a value against a ReformerConfig annotation string ('int', 'list[str] | None', ...)."""
    simple = {"int": _is_int, "float": _is_num, "bool": lambda x: isinstance(x, bool),
              "str": lambda x: isinstance(x, str), "None": lambda x: x is None}
    for alt in (a.strip() for a in annotation.split("|")):
        if alt in simple and simple[alt](v):
            return None
        if alt.startswith("list[") and isinstance(v, list) and all(simple.get(alt[5:-1], lambda x: True)(x) for x in v):
            return None
    return f"expected {annotation.replace('None', 'none')}"


def _build_model(d: dict[str, Any], source: str) -> ReformerConfig:
    fields = {f.name: f for f in dataclasses.fields(ReformerConfig)}
    for k, v in d.items():
        if k not in fields:
            raise ConfigError(f"model.{k}: unknown key (known: {', '.join(sorted(fields))})")
        err = _model_type_error(str(fields[k].type), v)
        if err:
            raise ConfigError(f"model.{k}: {err} (got {v!r})")
    try:
        return ReformerConfig.from_dict(dict(d), source=source)
    except ValueError as e:  # "ReformerConfig.<field>: msg" -> "model.<field>: msg"
        msg = str(e)
        raise ConfigError(msg.replace("ReformerConfig.", "model.", 1) if msg.startswith("ReformerConfig.") else f"model: {msg}") from None
    except TypeError as e:
        raise ConfigError(f"model: {e}") from None


def _build_section(name: str, d: dict[str, Any]) -> Any:
    cls = SECTIONS[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in d.items():
        if k not in fields:
            raise ConfigError(f"{name}.{k}: unknown key (known: {', '.join(fields)})")
        err = fields[k].metadata["check"](v)
        if err:
            raise ConfigError(f"{name}.{k}: {err} (got {v!r})")
    return cls(**d)


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
    cfg = RunConfig(source=source)
    for section, body in raw.items():
        setattr(cfg, section, _build_model(body, source) if section == "model" else _build_section(section, body))
    check_cross_fields(cfg)
    return cfg


def from_dict(d: dict[str, dict[str, Any]], source: str = "dict") -> RunConfig:
    """Rebuild a RunConfig from `RunConfig.to_dict()` output (e.g. a checkpoint's run_config.json)."""
    cfg = RunConfig(source=source)
    for section, body in d.items():
        if section not in SECTIONS:
            raise ConfigError(f"{section}: unknown section (known: {', '.join(SECTIONS)})")
        setattr(cfg, section, _build_model(body, source) if section == "model" else _build_section(section, body))
    check_cross_fields(cfg)
    return cfg


def check_cross_fields(cfg: RunConfig) -> None:
    """Checks that involve two sections and need no world size."""
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} exceeds the model's maximum length "
                          f"{cfg.model.max_seq_len} (model.axial_pos_shape = {cfg.model.axial_pos_shape}, their product)")
    t = cfg.train
    if t.decay_steps is not None and t.decay_steps < t.warmup_steps:
        raise ConfigError(f"train.decay_steps: {t.decay_steps} is before the end of warmup (train.warmup_steps = {t.warmup_steps})")
    if cfg.deepspeed.config is not None and not Path(cfg.deepspeed.config).is_file():
        raise ConfigError(f"deepspeed.config: no such file {cfg.deepspeed.config}")
    if cfg.data.reset_positions and not cfg.data.document_masking:
        raise ConfigError("data.reset_positions: needs data.document_masking = true (positions restart per document)")
    p = cfg.parallel
    if p.ulysses_size is not None and p.sequence_parallel_size % p.ulysses_size:
        raise ConfigError(f"parallel.ulysses_size: {p.ulysses_size} must divide parallel.sequence_parallel_size = "
                          f"{p.sequence_parallel_size}")
    if cfg.data.document_masking and p.ulysses_size is not None and p.ulysses_size < p.sequence_parallel_size:
        raise ConfigError("data.document_masking: not supported with bucket sharding (parallel.ulysses_size < "
                          "parallel.sequence_parallel_size); use pure Ulysses")
    if p.sequence_parallel_size > 1:
        from reformer_dist.parallel.sequence import check_layout  # the one place the layout rules live

        try:
            check_layout(cfg.model, cfg.data.seq_len, p.sequence_parallel_size,
                         p.ulysses_size or p.sequence_parallel_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None


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
    if world_size % sp:
        raise ConfigError(f"parallel.sequence_parallel_size: {sp} does not divide the world size {world_size}")
    dp = world_size // sp
    t = cfg.train
    per_step = t.micro_batch * dp  # sequences per micro-step over all ranks
    if t.global_batch is None:
        ga = t.grad_accum or 1
    else:
        if t.global_batch % per_step:
            raise ConfigError(
                f"train.global_batch: {t.global_batch} is not a multiple of train.micro_batch * data-parallel size "
                f"= {t.micro_batch} * {dp} = {per_step} (world size {world_size}, sequence_parallel_size {sp})")
        ga = t.global_batch // per_step
        if t.grad_accum is not None and t.grad_accum != ga:
            raise ConfigError(
                f"train.grad_accum: {t.grad_accum} disagrees with train.global_batch = {t.global_batch} = "
                f"micro_batch {t.micro_batch} * grad_accum {ga} * data-parallel size {dp}; set only one of them")
    return BatchPlan(world_size=world_size, sp_size=sp, dp_size=dp, micro_batch=t.micro_batch, grad_accum=ga,
                     global_batch=per_step * ga, seq_len=cfg.data.seq_len)


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
        out.append(f"[{section}]")
        if cls is ReformerConfig:
            out.append("  (ReformerConfig fields, see reformer_dist/model/config.py)")
            for f in dataclasses.fields(cls):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
                out.append(f"  {f.name} = {default!r}")
            continue
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            out.append(f"  {f.name} = {default!r}  # {f.metadata.get('doc', '')}")
    return "\n".join(out)
