"""Host buffers an async save copies the training state into, kept from one save to the next.

The train loop waits only for this copy: the background write then reads the buffers while
training changes the real tensors. The buffers mirror the state dict's structure once (a
DTensor's buffer is a DTensor over the same mesh and placements, so DCP plans the same shards);
each later save copies each local shard into its buffer, and builds new buffers only when the
structure changed (the optimizer's state appearing after its first step, say). On a GPU the
buffers are pinned, so the copy out of device memory runs at the bus's speed.

torch's own DefaultStager does the same through a generic deep copy; on this machine that took
about 19 ms a save for 35 MB of a small model's state, against about 3 ms for this copy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor


def _signature(tree: Any) -> Any:
    """What must stay the same for the buffers to be reused: keys, shapes, dtypes, layouts."""
    if isinstance(tree, dict):
        return tuple((k, _signature(v)) for k, v in tree.items())
    if isinstance(tree, (list, tuple)):
        return (type(tree).__name__, *(_signature(v) for v in tree))
    if isinstance(tree, DTensor):
        local = tree._local_tensor
        return ("dtensor", tree.shape, tree.stride(), tree.placements, local.shape, local.dtype)
    if isinstance(tree, torch.Tensor):
        return ("tensor", tree.shape, tree.dtype)
    return ("value", type(tree).__name__)


class StagingBuffers:
    """Reusable host copies of a state dict (nested dicts and lists of tensors and values)."""

    def __init__(self, pin_memory: bool = False) -> None:
        self.pin_memory = pin_memory
        self._signature: Any = None
        self._buffers: Any = None

    def _empty_like(self, local: torch.Tensor) -> torch.Tensor:
        return torch.empty(local.shape, dtype=local.dtype, device="cpu", pin_memory=self.pin_memory)

    def _build(self, tree: Any) -> Any:
        if isinstance(tree, dict):
            return {k: self._build(v) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(self._build(v) for v in tree)
        if isinstance(tree, DTensor):
            buf = self._empty_like(tree._local_tensor)
            return DTensor.from_local(
                buf,
                tree.device_mesh,
                tree.placements,
                run_check=False,
                shape=tree.shape,
                stride=tree.stride(),
            )
        if isinstance(tree, torch.Tensor):
            return self._empty_like(tree)
        return tree

    def _fill(self, dst: Any, src: Any) -> Any:
        if isinstance(src, dict):
            return {k: self._fill(dst[k], v) for k, v in src.items()}
        if isinstance(src, (list, tuple)):
            return type(src)(self._fill(d, s) for d, s in zip(dst, src, strict=True))
        if isinstance(src, DTensor):
            dst._local_tensor.copy_(src._local_tensor, non_blocking=self.pin_memory)
            return dst
        if isinstance(src, torch.Tensor):
            dst.copy_(src, non_blocking=self.pin_memory)
            return dst
        return src  # an int or a string: immutable, nothing to copy

    @torch.no_grad()
    def stage(self, state_dict: dict) -> dict:
        """A host copy of ``state_dict`` in the kept buffers, complete when this returns."""
        signature = _signature(state_dict)
        if signature != self._signature:
            self._buffers, self._signature = self._build(state_dict), signature
        staged = self._fill(self._buffers, state_dict)
        if self.pin_memory:
            torch.cuda.synchronize()  # the non-blocking copies must land before the write reads
        return staged
