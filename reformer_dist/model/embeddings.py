"""Axial position embeddings: a*b positions from a+b learned vectors (HF layout).

Shapes: L positions, D d_model = d1 + d2 (the two axial widths).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reformer_dist.model.config import ReformerConfig


class AxialPositionEmbedding(nn.Module):
    """E[p] = concat(rows[p // b], cols[p % b]) for axial_pos_shape (a, b): a*b positions from a+b vectors."""

    def __init__(self, cfg: ReformerConfig):
        super().__init__()
        a, b = cfg.axial_pos_shape
        d1, d2 = cfg.axial_pos_dims
        self.shape = (a, b)
        self.rows = nn.Parameter(torch.randn(a, d1) * cfg.axial_norm_std)
        self.cols = nn.Parameter(torch.randn(b, d2) * cfg.axial_norm_std)

    def forward(self, positions: Tensor) -> Tensor:
        b = self.shape[1]
        return torch.cat([self.rows[positions // b], self.cols[positions % b]], dim=-1)
