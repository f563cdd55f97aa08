#!/usr/bin/env python3
"""A reformer_dist ZeRO checkpoint -> model.safetensors + config.json, needing only torch and safetensors.

reformer-train copies this file next to the checkpoints it writes (as DeepSpeed does with its
zero_to_fp32.py), so the weights can be recovered where neither reformer_dist nor DeepSpeed is installed:

    python checkpoints/zero_to_safetensors.py checkpoints/ model/                 # the tag named by `latest`
    python checkpoints/zero_to_safetensors.py checkpoints/step_00000300 model/ --dtype bf16

It reassembles DeepSpeed's fp32 master weights as deepspeed.utils.zero_to_fp32 does (ZeRO-1/2: every
rank's flat partition of each parameter group, concatenated; ZeRO-3: each parameter's slice from every
rank; no ZeRO: the module itself) and writes OUT/model.safetensors and OUT/config.json, the model section
of the tag's run_config.json; `ReformerLM.from_pretrained(OUT)` loads it. Nothing is verified or
checksummed here: with the package installed, `reformer-ckpt consolidate` does both. The names of the
files it reads and writes are reformer_dist's (reformer_dist/ondisk.py);
tests/distributed/test_zero_to_safetensors.py runs this script, in a Python that has neither package,
against real checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import re
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

LATEST, RUN_CONFIG, CONFIG_NAME, WEIGHTS_NAME = "latest", "run_config.json", "config.json", "model.safetensors"
_NUMBER = re.compile(r"(\d+)")


class _Missing:
    """Stands in for a class of a package this machine lacks (DeepSpeed pickles its own objects, e.g. its
    loss scaler, into the state files); none of them is needed for the weights."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.args = args

    def __setstate__(self, state: object) -> None:
        self.state = state


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> type:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Missing,), {"__module__": module})


_PICKLE = types.SimpleNamespace(__name__="pickle", Unpickler=_Unpickler, load=pickle.load)


def _load(path: Path) -> dict:
    """A DeepSpeed state file, memory-mapped (tensors are read when used)."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False, pickle_module=_PICKLE)


def _files(tag_dir: Path, suffix: str) -> list[Path]:
    """DeepSpeed's *_<suffix>.pt files of a tag, in rank order."""
    found = tag_dir.glob(f"*_{suffix}.pt")
    return sorted(found, key=lambda p: [int(t) if t.isdigit() else t for t in _NUMBER.split(p.name)])


def find_tag(path: Path) -> Path:
    """A tag folder itself, or the one a checkpoint root's `latest` names."""
    if _files(path, "model_states"):
        return path
    if (path / LATEST).is_file():
        return path / (path / LATEST).read_text().strip()
    raise SystemExit(f"{path}: neither a checkpoint folder (*_model_states.pt) nor a root with a `{LATEST}` file")


def _zero12(param_shapes: list[dict], optim: list[dict]) -> dict[str, torch.Tensor]:
    """ZeRO-1/2 (and bf16 without ZeRO): per parameter group, the ranks' flat partitions concatenated hold
    the parameters in order, each followed by its alignment padding."""
    state = {}
    paddings = optim[0].get("param_alignment_paddings")
    for g, shapes in enumerate(param_shapes):
        flat = torch.cat([o["single_partition_of_fp32_groups"][g] for o in optim])
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            n = math.prod(shape)
            state[name] = flat.narrow(0, offset, n).view(shape)
            offset += n + (paddings[g][i] if paddings is not None else 0)
    return state


def _zero3(param_shapes: list[dict], optim: list[dict]) -> dict[str, torch.Tensor]:
    """ZeRO-3: every parameter is split into `world` slices of ceil(n / world) (the last padded); rank r's
    flat groups hold its slice of every parameter, in order."""
    world = len(optim)
    flats = [torch.cat(list(o["fp32_flat_groups"])) for o in optim]
    state, offset = {}, 0
    for shapes in param_shapes:
        for name, shape in shapes.items():
            n = math.prod(shape)
            part = math.ceil(n / world)
            state[name] = torch.cat([f.narrow(0, offset, part) for f in flats])[:n].view(shape)
            offset += part
    return state


def fp32_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of one checkpoint tag."""
    model = _load(_files(tag_dir, "model_states")[0])
    optim_files = _files(tag_dir, "optim_states")
    if not optim_files:  # no ZeRO partitions: the engine saved the whole module
        return {k: v.float() for k, v in model["module"].items()}
    optim = [_load(f)["optimizer_state_dict"] for f in optim_files]
    merge = _zero3 if "fp32_flat_groups" in optim[0] else _zero12
    state = {k: v.float() for k, v in model["module"].items() if k in model.get("buffer_names", [])}
    state.update(merge(model["param_shapes"], optim))
    for name, source in model.get("shared_params", {}).items():  # tied weights are stored once
        state[name] = state[source]
    for prefix in ("module.", "_orig_mod."):  # wrappers (DDP, torch.compile), if a caller used one
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def model_config(tag_dir: Path) -> dict:
    """The model config: the tag's run_config.json (written by reformer-train), else a config.json beside it."""
    for path in (tag_dir / RUN_CONFIG, tag_dir / CONFIG_NAME, tag_dir.parent / CONFIG_NAME):
        if path.is_file():
            body = json.loads(path.read_text())
            return body["config"]["model"] if path.name == RUN_CONFIG else body
    raise SystemExit(f"{tag_dir}: no {RUN_CONFIG} or {CONFIG_NAME} to take the model config from")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a checkpoint root (its `latest` tag) or one step_XXXXXXXX folder")
    p.add_argument("out", type=Path, help="folder to write model.safetensors and config.json into")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="stored weight dtype (default fp32)")
    args = p.parse_args(argv)
    tag_dir = find_tag(args.checkpoint)
    config = model_config(tag_dir)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    # contiguous copies: safetensors refuses views that share storage
    state = {k: v.to(dtype).contiguous().clone() for k, v in fp32_state_dict(tag_dir).items()}
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out / WEIGHTS_NAME), metadata={"format": "pt", "config": json.dumps(config)})
    (args.out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    print(f"{args.out}: {len(state)} tensors, {sum(v.numel() for v in state.values()):,} parameters from {tag_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
