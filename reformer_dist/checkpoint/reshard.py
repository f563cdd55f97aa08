"""Reshard a ZeRO checkpoint for another world size: DeepSpeed universal checkpoint conversion.

    reformer-ckpt reshard CKPT_DIR --out OUT [--tag T] [--to-stage N]

writes OUT/<tag>/ (zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt: every parameter and its Adam moments,
unpartitioned, plus the model-state files) and OUT/latest_universal. Load it with ANY number of ranks by
adding `"checkpoint": {"load_universal": true}` to the DeepSpeed config and calling
`engine.load_checkpoint(OUT, tag=None, load_optimizer_states=True, load_lr_scheduler_states=False)`.

Which ZeRO stage may load what (all 2 gloo ranks -> 1 rank, fp32, torch Adam, a tiny reversible
ReformerLM; "works" = the resumed run's next two losses equal the uninterrupted 2-rank run's within
1e-5, and the loaded weights equal the saved ones exactly). Verified with deepspeed 0.19.8 by
tests/distributed/test_reshard.py (ZeRO-2 -> ZeRO-2 and ZeRO-1) and the sweep in docs/checkpoints.md:

    saved \\ loaded   ZeRO-1   ZeRO-2   ZeRO-3
    ZeRO-1           works    works    fails
    ZeRO-2           works    works    fails
    ZeRO-3           fails    fails    works

Unverified or failing transitions are refused before any work. `reformer-train --resume OUT` resumes it
on any world size with the same global batch: rank 0's trainer state (step, global loader position) is
copied along; per-rank RNG streams (dropout) restart from a seed derived from the step.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

from reformer_dist.checkpoint.deepspeed_ckpt import describe, pinned_checkpoint, verify_files
from reformer_dist.checkpoint.writer import apply_umask, check_writable
from reformer_dist.ondisk import CONFIG_NAME, RESHARD_INFO, RUN_CONFIG, rank_state_file

# (saved stage, loading stage) pairs verified to resume exactly; see the module docstring.
SUPPORTED: dict[tuple[int, int], bool] = {
    (1, 1): True,
    (1, 2): True,
    (2, 1): True,
    (2, 2): True,
    (3, 3): True,
    (1, 3): False,
    (2, 3): False,
    (3, 1): False,
    (3, 2): False,
}


class UnsupportedReshardError(ValueError):
    """The requested stage transition is not supported; the message says which ones are."""


def supported_targets(stage: int) -> list[int]:
    return [t for (s, t), ok in sorted(SUPPORTED.items()) if s == stage and ok]


def check_transition(src_stage: int, dst_stage: int) -> None:
    if SUPPORTED.get((src_stage, dst_stage)):
        return
    ok = supported_targets(src_stage)
    why = "fails to resume in our verification" if (src_stage, dst_stage) in SUPPORTED else "is not verified"
    raise UnsupportedReshardError(
        f"--to-stage {dst_stage}: a ZeRO-{src_stage} checkpoint loaded as ZeRO-{dst_stage} {why} "
        f"(DeepSpeed universal checkpoint, deepspeed 0.19.8). Supported from ZeRO-{src_stage}: "
        f"{', '.join(f'ZeRO-{t}' for t in ok) or 'none'}; see docs/checkpoints.md"
    )


def reshard(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    tag: str | None = None,
    to_stage: int | None = None,
    workers: int = 1,
    overwrite: bool = False,
    verify: bool = True,
    quiet: bool = True,
) -> dict:
    """Convert one checkpoint tag into a universal checkpoint root OUT; returns a summary (also in OUT/reshard.json)."""
    # deepspeed takes seconds to import and logs its accelerator choice: only this command pays for it
    from deepspeed.checkpoint import ds_to_universal

    check_writable(out_dir, overwrite, [ckpt_dir])  # the path as given: before anything is read
    # a run may rotate this folder meanwhile: read a pinned copy (hard links), name the original
    with pinned_checkpoint(ckpt_dir, tag) as (ref, pinned):
        info = describe(pinned)
        if info.universal:
            raise UnsupportedReshardError(f"{ref.path}: already a universal checkpoint")
        if info.zero_stage not in (1, 2, 3):
            raise UnsupportedReshardError(
                f"{ref.path}: ZeRO stage {info.zero_stage}; only ZeRO-1/2/3 checkpoints reshard"
            )
        target = info.zero_stage if to_stage is None else int(to_stage)
        check_transition(info.zero_stage, target)
        check_writable(out_dir, overwrite, [ckpt_dir, ref.root, ref.path])
        verified = verify_files(pinned.path) if verify else "not verified"

        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            args = argparse.Namespace(
                input_folder=str(pinned.path),
                output_folder=str(tmp / ref.tag),
                num_extract_workers=workers,
                num_merge_workers=workers,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=True,
            )
            sink = io.StringIO()
            with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
                try:
                    ds_to_universal.main(args)  # also writes tmp/latest_universal
                except Exception as e:  # noqa: BLE001 - surface DeepSpeed's failure with the folder named
                    raise RuntimeError(
                        f"{ref.path}: universal conversion failed ({type(e).__name__}: {e})\n{sink.getvalue()[-2000:]}"
                    ) from e
            for extra in (RUN_CONFIG, CONFIG_NAME):
                for src in (pinned.path / extra, pinned.root / extra):
                    if src.is_file() and not (tmp / ref.tag / extra).exists():
                        shutil.copy2(src, tmp / ref.tag / extra)
            # reformer-train resumes a universal checkpoint from rank 0's step/loader state (the loader
            # position is global, so it holds for any data-parallel size with the same global batch).
            rank0 = pinned.path / rank_state_file(0)
            if rank0.is_file():
                (tmp / ref.tag / rank_state_file(0)).parent.mkdir(exist_ok=True)
                shutil.copy2(rank0, tmp / ref.tag / rank_state_file(0))
            summary = {
                "source": str(ref.path),
                "tag": ref.tag,
                "step": info.step,
                "source_zero_stage": info.zero_stage,
                "source_world_size": info.world_size,
                "load_as_zero_stage": supported_targets(info.zero_stage),
                "verified_input": verified,
                "how_to_load": 'DeepSpeed config "checkpoint": {"load_universal": true}; '
                "engine.load_checkpoint(OUT, tag=None, load_optimizer_states=True, "
                "load_lr_scheduler_states=False)",
            }
            (tmp / RESHARD_INFO).write_text(json.dumps(summary, indent=2) + "\n")
            apply_umask(tmp)  # mkdtemp made it 0700
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return {**summary, "out": str(out)}
