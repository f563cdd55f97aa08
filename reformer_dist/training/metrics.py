"""Run metrics: JSON lines (+ TensorBoard, + a tqdm bar) on rank 0, optional per-rank JSON lines.

metrics.jsonl records, one JSON object a line, appended across resumes:
    {"event": "start", "world_size": N, "resume_step": s | null, ...}   once per process start
    {"event": "step", "step", "loss", "lr", "tokens_per_s", "grad_norm", "skipped", "mem_gb", "threads", ...}
    {"event": "threads", "step", "threads", "reason", "step_time_s"}   train.threads = "auto" changed its choice
    {"event": "eval", "step", "eval_loss", "bits_per_token", "bits_per_byte"?, "unigram_loss", ...}
    {"event": "end" | "preempted" | "stopped", "step", ...}
`reformer-plot` reads them; after a resume it keeps, for each step, the record written last.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from tqdm.auto import tqdm

from reformer_dist.config_schema import Section, boolean, int_min, opt
from reformer_dist.ondisk import METRICS, RANKS_DIR, TENSORBOARD_DIR, rank_metrics_file

log = logging.getLogger(__name__)


@dataclass
class LoggingConfig(Section):
    log_every: int = opt(1, int_min(1), "write a step record every N steps")
    tensorboard: bool = opt(True, boolean, "TensorBoard scalars under <output.dir>/tb (rank 0)")
    progress_bar: bool = opt(True, boolean, "tqdm bar on rank 0")
    rank_files: bool = opt(
        False, boolean, "every rank writes its own <output.dir>/ranks/rank<R>.jsonl (tests, debugging)"
    )


def memory_gb(device: torch.device) -> float:
    """Peak accelerator memory (CUDA) or peak resident memory of the process (CPU), in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no nan/inf
    if isinstance(v, torch.Tensor):
        return _clean(v.item())
    return v


class Metrics:
    def __init__(
        self,
        run_dir: Path,
        rank: int,
        world_size: int,
        total_steps: int,
        initial_step: int,
        tensorboard: bool,
        progress_bar: bool,
        rank_files: bool,
        log_every: int,
    ):
        self.rank, self.world_size, self.log_every = rank, world_size, log_every
        self.main = rank == 0
        self._file = open_for_append(run_dir / METRICS) if self.main else None
        self._rank_file = None
        if rank_files:
            (run_dir / RANKS_DIR).mkdir(parents=True, exist_ok=True)
            self._rank_file = open_for_append(run_dir / rank_metrics_file(rank))
        self._tb = None
        if self.main and tensorboard:
            try:
                # only rank 0 with logging.tensorboard needs it, and a missing tensorboard degrades to
                # JSON lines here instead of failing every import of this module
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(
                    str(run_dir / TENSORBOARD_DIR), purge_step=initial_step + 1 if initial_step else None
                )
            except ImportError:  # pragma: no cover - tensorboard is a dependency; degrade rather than die
                log.warning("tensorboard is not installed; writing JSON lines only")
        self._bar = None
        if self.main and progress_bar:
            self._bar = tqdm(
                total=total_steps,
                initial=initial_step,
                unit="step",
                dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 30.0,
                file=sys.stderr,
            )

    # ------------------------------------------------------------------ writing
    def _write(self, record: dict[str, Any]) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._rank_file is not None:
            self._rank_file.write(json.dumps({**record, "rank": self.rank, "world_size": self.world_size}) + "\n")
            self._rank_file.flush()

    def event(self, name: str, **fields: Any) -> None:
        self._write({"event": name, "time": time.time(), **fields})

    def step(self, rec: dict[str, Any]) -> None:
        step = rec["step"]
        if step % self.log_every == 0 or rec.get("skipped"):
            self._write({"event": "step", **rec})
        if self._tb is not None:
            for k in ("loss", "lr", "tokens_per_s", "grad_norm", "mem_gb", "threads"):
                v = rec.get(k)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"train/{k}", v, step)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(
                loss=f"{rec['loss']:.4f}",
                lr=f"{rec['lr']:.2e}",
                tok_s=f"{rec['tokens_per_s']:.0f}",
                mem=f"{rec['mem_gb']:.2f}GB",
                refresh=False,
            )

    def eval(self, rec: dict[str, Any]) -> None:
        self._write({"event": "eval", **rec})
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"eval/{k}", v, rec["step"])

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        for f in (self._file, self._rank_file):
            if f is not None:
                f.close()
        self._file = self._rank_file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def open_for_append(path: Path) -> IO[str]:
    """A JSON-lines file opened for appending. A last line cut by a crash or power loss (no newline at the
    end) is ended first, with a warning, so the next record starts on its own line instead of joining the
    cut one (which made both unreadable); the cut bytes stay as they are."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size:
                f.seek(size - 1)
                cut = f.read(1) != b"\n"
    except FileNotFoundError:
        size, cut = 0, False
    handle = open(path, "a")
    if size and cut:
        handle.write("\n")
        handle.flush()
        log.warning(
            f"{path}: its last line was cut (a crash or power loss during a write); it is kept as it is and "
            "new records start on the next line (reformer-plot skips the cut one and says so)"
        )
    return handle


_RECORD_START = '{"event"'


def read_records(path: str | Path, problems: list[str] | None = None) -> list[dict[str, Any]]:
    """metrics.jsonl -> records, with the ones a resume superseded dropped.

    A start record with resume_step=s means the run went back to step s: records of steps > s written
    before it belong to the abandoned continuation and are dropped. A line that is not a JSON record (cut
    by a crash) is skipped and described in `problems` (line number and what was done); when a complete
    record follows the cut one on the same line (written by a version that appended to the cut line), that
    record is kept.
    """
    out: list[dict[str, Any]] = []
    problems = [] if problems is None else problems
    with open(path, errors="replace") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            rec = _parse_record(line)
            if rec is None:
                tail = line.rfind(_RECORD_START, 1)
                rec = _parse_record(line[tail:]) if tail > 0 else None
                problems.append(
                    f"{path}:{number}: not a JSON record (cut by a crash or power loss?): "
                    + ("its complete record after the cut one is kept" if rec else "skipped")
                    + f": {line[:60]!r}"
                )
                if rec is None:
                    continue
            if rec.get("event") == "start":
                s = rec.get("resume_step") or 0
                out = [r for r in out if r.get("event") == "start" or r.get("step", 0) <= s]
            out.append(rec)
    return out


def _parse_record(text: str) -> dict[str, Any] | None:
    try:
        rec = json.loads(text)
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None
