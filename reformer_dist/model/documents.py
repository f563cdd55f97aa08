"""Documents in packed windows: which document each token belongs to, and positions that restart per document.

A store separates documents by the tokenizer's end-of-document id; a training window may hold several.
With ``document_ids`` the model lets a token attend only to tokens of its own document (every attention
kind, every core); with ``positions_in_document`` its position embeddings restart at each document.
"""

from __future__ import annotations

import torch
from torch import Tensor


def document_ids(input_ids: Tensor, eod_id: int) -> Tensor:
    """[B, L] int32: the document of every token, counted from the window's start. An end-of-document token
    belongs to the document it ends; the token after it starts the next one."""
    eod = (input_ids == eod_id).to(torch.int32)
    return eod.cumsum(dim=-1, dtype=torch.int32) - eod


def positions_in_document(document_ids: Tensor) -> Tensor:
    """[B, L] int64: each token's distance from the first token of its document in the window."""
    t = torch.arange(document_ids.shape[-1], device=document_ids.device).expand_as(document_ids)
    first = torch.ones_like(document_ids, dtype=torch.bool)
    first[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start = torch.where(first, t, torch.zeros_like(t)).cummax(dim=-1).values
    return t - start
