"""The contract between the training code and DeepSpeed: what `training/` calls on the engine that
`deepspeed.initialize` returns, and on the optimizer whose step a non-finite loss skips.

Written as Protocols so the seam is explicit and checked by mypy without importing DeepSpeed's types
(DeepSpeed is untyped to the checker); `deepspeed.DeepSpeedEngine` satisfies `Engine` structurally.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:  # only for the checker: importing the model here would make config loading import it
    from reformer_dist.model.reformer import ReformerLM


class Engine(Protocol):
    """The methods and attributes of a DeepSpeed engine that training/ uses."""

    module: ReformerLM  # the wrapped model
    skipped_steps: int  # DeepSpeed's own count of steps it skipped (fp16 overflow)

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def backward(self, loss: torch.Tensor) -> Any: ...

    def step(self) -> None: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    def get_global_grad_norm(self) -> float | None: ...

    def save_checkpoint(
        self,
        save_dir: str,
        tag: str | None = None,
        client_state: dict[str, Any] | None = None,
        save_latest: bool = True,
    ) -> Any: ...

    def load_checkpoint(
        self,
        load_dir: str,
        tag: str | None = None,
        load_optimizer_states: bool = True,
        load_lr_scheduler_states: bool = True,
    ) -> tuple[str | None, Any]: ...


class SkippableOptimizer(Protocol):
    """The optimizer of training/optimizer.py: its next `step()` is a no-op when `skip_next_step` is set."""

    skip_next_step: bool
    param_groups: list[dict[str, Any]]

    def step(self, *args: Any, **kwargs: Any) -> Any: ...
