"""The attention cores by name: the one list that ``[model] attention_backend`` accepts and that
``kernels.chunked_attention`` dispatches over. No torch import, so validating a config loads no kernel code.
"""

from __future__ import annotations

from typing import Literal, get_args

Backend = Literal["auto", "reference", "blockwise", "triton"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)
# PyTorch cores (any device); the rest are fused kernels whose modules import optional packages (triton)
PORTABLE: tuple[Backend, ...] = ("reference", "blockwise")
# fused core -> the module that defines it as ``chunked_attention_<name>`` and ``unsupported`` (imported by name at
# first use, so that triton stays optional and the module needs nothing of the dispatcher)
FUSED: dict[Backend, str] = {"triton": "reformer_dist.kernels.triton_lsh"}
