"""ZeRO checkpoint (any stage, with or without optimizer offload, any world size) -> one weights folder:

    OUT/config.json        our ReformerConfig (what `ReformerLM.from_pretrained` reads)
    OUT/model.safetensors  full weights, fp32 master copy (or bf16); sharded with
                           model.safetensors.index.json above --max-shard-size
    OUT/checksums.json     SHA-256 of every file above, verified on load

The weights are DeepSpeed's fp32 master copy (the optimizer partitions), reassembled by
`deepspeed.utils.zero_to_fp32` — bit-identical to the live model's fp32 parameters, and more precise
than the bf16 module of a bf16 run. Input files are verified first (trainer MANIFEST.json, else the CRC
of every .pt record), so a damaged shard is reported by name rather than turned into a wrong model.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch

from reformer_dist.checkpoint.deepspeed_ckpt import (
    CheckpointRef,
    describe,
    load_meta,
    model_state_files,
    optim_state_files,
    pinned_checkpoint,
    read_model_config,
    verify_files,
)
from reformer_dist.checkpoint.hf_adapter import expected_shapes
from reformer_dist.checkpoint.writer import DEFAULT_MAX_SHARD, check_writable, write_weights_dir
from reformer_dist.model.config import DOCUMENT_SETTINGS, TRAINED_WITH, ReformerConfig
from reformer_dist.ondisk import RUN_CONFIG, CorruptCheckpointError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers, if a caller used one


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def fp32_state_dict(ref: CheckpointRef, quiet: bool = True) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a checkpoint tag (ZeRO-1/2/3 via zero_to_fp32; stage 0 from the module)."""
    # deepspeed takes seconds to import and logs its accelerator choice: only this command pays for it
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, to_torch_tensor

    if not optim_state_files(ref.path):  # no ZeRO partitions: a stage-0 engine saved the whole module
        module = load_meta(model_state_files(ref.path)[0]).get("module") or {}
        return {k: v.detach().float().clone() for k, v in module.items()}
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        try:
            lazy = get_fp32_state_dict_from_zero_checkpoint(str(ref.root), tag=ref.tag, lazy_mode=True)
        except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
            raise CorruptCheckpointError(
                f"{ref.path}: zero_to_fp32 cannot reassemble it ({type(e).__name__}: {e})"
            ) from e
        return to_torch_tensor(lazy)  # the optimizer files are memory-mapped: tensors are read here


def _trained_with(ref: CheckpointRef, cfg_src: str) -> dict[str, bool]:
    """The document settings of the run that wrote the checkpoint: its run_config.json's [data], or what the
    config.json the model config came from records; {} when neither says."""
    run_config = ref.path / RUN_CONFIG
    if run_config.is_file():
        try:
            data = json.loads(run_config.read_text())["config"]["data"]
            return {k: bool(data.get(k, False)) for k in DOCUMENT_SETTINGS}
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return ReformerConfig.trained_with(cfg_src)


def consolidate(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    tag: str | None = None,
    dtype: str = "fp32",
    config: str | Path | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD,
    overwrite: bool = False,
    verify: bool = True,
) -> dict:
    """Write OUT (config.json + safetensors + checksums.json) from a DeepSpeed checkpoint; returns a summary."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    check_writable(out_dir, overwrite, [ckpt_dir, config])  # the paths as given: before anything is read
    # a run may rotate this folder meanwhile: read a pinned copy (hard links), name the original
    with pinned_checkpoint(ckpt_dir, tag) as (ref, src):
        inputs = [ckpt_dir, ref.root, ref.path, config]  # the root too: `latest` and the other tags live there
        check_writable(out_dir, overwrite, inputs)
        cfg, cfg_src = read_model_config(src, config)
        cfg_src = cfg_src.replace(str(src.root), str(ref.root))
        verified = verify_files(src.path) if verify else "not verified (--no-verify)"
        info = describe(src)
        state = _strip_wrappers(fp32_state_dict(src))
        want = expected_shapes(cfg)
        missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
        if missing or unexpected:
            raise ValueError(
                f"{ref.path}: weights do not match the model config {cfg_src}: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        for k, shape in want.items():
            if tuple(state[k].shape) != shape:
                raise ValueError(f"{ref.path}: {k} has shape {tuple(state[k].shape)}, config {cfg_src} needs {shape}")
        # model order; views into the flat fp32 groups are copied (safetensors refuses shared storage)
        state = {k: state[k].to(DTYPES[dtype]) for k in want}
        state = {k: v.clone() if v._base is not None else v for k, v in state.items()}
        trained = _trained_with(src, cfg_src)
        config_out = {**cfg.to_dict(), **({TRAINED_WITH: trained} if trained else {})}
        provenance = {
            "source": str(ref.path),
            "step": info.step,
            "zero_stage": info.zero_stage,
            "world_size": info.world_size,
            "dtype": dtype,
        }
        files = write_weights_dir(
            out_dir,
            state,
            config_out,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            inputs=inputs,
            metadata={"config": json.dumps(cfg.to_dict()), "reformer_dist": json.dumps(provenance)},
        )
    return {
        **provenance,
        "out": str(out_dir),
        "files": [f.name for f in files],
        "config_from": cfg_src,
        "verified": verified,
        "parameters": sum(v.numel() for v in state.values()),
    }
