"""Tracked allocations: the peak bytes of tensor storage alive at once while a block runs (any device).

A ``TorchDispatchMode`` sees every tensor an operator creates (forward and backward); each new storage is
counted until Python frees it. Unlike peak RSS or a caching allocator's statistics this does not depend
on the allocator, the machine or timing, so memory bounds can be unit tests::

    with AllocationTracker() as t:
        loss = model.loss(ids); loss.backward()
    t.peak_bytes   # most bytes of tensors created inside the block that were alive at the same time

Tensors that existed before the block (weights, inputs) are not counted; storages shared by views are
counted once. It slows every operator a little: use it on small shapes in tests, not in benchmarks.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class AllocationTracker(TorchDispatchMode):
    """Peak and current bytes of storages created by operators inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak_bytes = 0
        self._live: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self.current -= nbytes
        self._live.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key, nbytes = st.data_ptr(), st.nbytes()
            if nbytes == 0 or key in self._live or key in inputs:  # views and in-place results allocate nothing
                continue
            self._live.add(key)
            self.current += nbytes
            self.peak_bytes = max(self.peak_bytes, self.current)
            weakref.finalize(st, self._freed, key, nbytes)
        return out
