"""A real one-rank torch.distributed group (gloo) and a tiny model, for Checkpointer tests.

Shared by the checkpoint unit tests; the multi-rank behaviour is in tests/integration.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from orchestrator.checkpoint import storage


@contextmanager
def one_rank(tmp_path: Path) -> Iterator[None]:
    """torch.distributed initialised as rank 0 of 1, torn down afterwards."""
    store = tmp_path / f"pg-{uuid.uuid4().hex}"
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=0, world_size=1, timeout=timedelta(seconds=60)
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def tiny_model(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()  # so the optimizer has state to save
    optimizer.zero_grad()
    return model, optimizer


@contextmanager
def storage_root(kind: str, tmp_path: Path) -> Iterator[str]:
    """A checkpoint root URL on a local disk or memory:// (an object store's semantics)."""
    if kind == "local":
        yield str(tmp_path / f"ckpt-{uuid.uuid4().hex}")
        return
    url = f"memory://spillway-test-{uuid.uuid4().hex}"
    try:
        yield url
    finally:
        fs, root = storage.open_root(url)
        storage.remove_tree(fs, root)
