"""Suite-wide setup. Without CUDA, Triton kernels run through Triton's interpreter (set before triton loads)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
