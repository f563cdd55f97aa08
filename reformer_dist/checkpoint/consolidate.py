"""ZeRO checkpoint (any stage, with or without optimizer offload, any world size) -> one weights folder:

    OUT/config.json        our ReformerConfig (what `ReformerLM.from_pretrained` reads)
    OUT/model.safetensors  full weights, fp32 master copy (or bf16); sharded with
                           model.safetensors.index.json above --max-shard-size
    OUT/training_data.json what it was trained on (tokenizer identity, document options: data/model_data.py),
                           from the checkpoint's run_config.json; + tokenizer.model for SentencePiece
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
    read_run_data,
    verify_files,
)
from reformer_dist.checkpoint.hf_adapter import expected_shapes
from reformer_dist.checkpoint.writer import DEFAULT_MAX_SHARD, check_writable, write_weights_dir
from reformer_dist.data.errors import DataError
from reformer_dist.data.model_data import record_files_from_run_config
from reformer_dist.model.config import DOCUMENT_SETTINGS, TRAINED_WITH, ReformerConfig
from reformer_dist.ondisk import RUN_CONFIG, TRAINING_DATA, CorruptCheckpointError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers, if a caller used one


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def model_state_dict(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """The checkpoint tag's fp32 weights under the model's own names (what `ReformerLM.load_state_dict`
    takes): `fp32_state_dict` without DDP / torch.compile prefixes."""
    return _strip_wrappers(fp32_state_dict(ref))


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
        state = model_state_dict(src)
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
        data = read_run_data(src.path)
        # the document settings the weights were trained with: the run's [data], else what config.json records
        trained = (
            {k: bool(data.get(k, False)) for k in DOCUMENT_SETTINGS}
            if data is not None
            else ReformerConfig.trained_with(cfg_src)
        )
        config_out = {**cfg.to_dict(), **({TRAINED_WITH: trained} if trained else {})}
        # what it was trained on goes with it (training_data.json + tokenizer.model, checksummed), so the folder
        # decodes and refuses other stores by itself once the checkpoint is gone
        record: dict[str, str | bytes] = {}
        record_note = f"{TRAINING_DATA} not written: {ref.path / RUN_CONFIG}: missing or without a [data] section"
        if data is not None:
            try:
                record = record_files_from_run_config(data, str(ref.path / RUN_CONFIG), cfg.vocab_size)
            except DataError as e:
                record_note = f"{TRAINING_DATA} not written: {e}"
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
            extra_files=record,
        )
    tokenizer = json.loads(record[TRAINING_DATA])["tokenizer"] if record else None
    return {
        **provenance,
        "tokenizer": tokenizer,
        **({} if record else {"tokenizer_note": record_note}),
        "out": str(out_dir),
        "files": [f.name for f in files],
        "config_from": cfg_src,
        "verified": verified,
        "parameters": sum(v.numel() for v in state.values()),
    }
