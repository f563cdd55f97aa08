"""The optimizer: AdamW over parameter groups (no decay on biases, norms, embeddings), whose next step
can be skipped (a non-finite loss), and the LR the schedule (schedule.py) sets before each step."""

from __future__ import annotations

from typing import Any

import torch

from reformer_dist.training.config import TrainConfig
from reformer_dist.training.engine import SkippableOptimizer
from reformer_dist.training.native_ops import announce_build


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices; not biases, norms or embeddings (token and axial position)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "emb" in name or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _skippable(base: type) -> type:
    """`base` optimizer whose next step() can be turned into a no-op (a skipped non-finite step)."""

    class Skippable(base):
        skip_next_step = False

        def step(self, *args: Any, **kwargs: Any) -> Any:
            if self.skip_next_step:
                return None
            return super().step(*args, **kwargs)

    Skippable.__name__ = Skippable.__qualname__ = f"Skippable{base.__name__}"
    return Skippable


def make_optimizer(
    model: torch.nn.Module, t: TrainConfig, on_cuda: bool, offload: bool, announce: bool = True
) -> SkippableOptimizer:
    """AdamW over `param_groups`; DeepSpeedCPUAdam under optimizer offload (`announce`: say when it is compiled)."""
    groups = param_groups(model, t.weight_decay)
    kw = dict(lr=t.lr, betas=tuple(t.betas), eps=t.eps)
    if offload:
        # ZeRO-Offload steps fp32 partitions on the host: DeepSpeed's CPUAdam, JIT-built once (~35 s); its
        # module is imported only here, so runs without offload never touch the op builder.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        if announce:
            announce_build("cpu_adam", "the host-side Adam of zero_optimization.offload_optimizer")
        return _skippable(DeepSpeedCPUAdam)(groups, adamw_mode=True, **kw)
    # A torch optimizer: no JIT build (FusedAdam costs ~65 s on CPU); fused kernel on CUDA.
    return _skippable(torch.optim.AdamW)(groups, **kw, **({"fused": True} if on_cuda else {"foreach": True}))


def set_lr(optimizer: SkippableOptimizer, lr: float) -> None:
    """Set every parameter group's learning rate (the schedule's value for the coming step)."""
    for g in optimizer.param_groups:
        g["lr"] = lr
