"""bench/common.py: what the benchmarks share that a wrong answer would skew (the baselines)."""

from __future__ import annotations

import importlib.util
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from orchestrator.checkpoint import catalog, manifest, storage

BENCH = Path(__file__).resolve().parents[2] / "bench"

FILES = {
    "model/__0_0.distcp": 5000,
    "model/__1_0.distcp": 3001,
    "model/nested/deeper/extra.bin": 17,
    ".metadata": 300,
    "empty.bin": 0,
}


def _load_common() -> ModuleType:
    # By path and under its own name: the benchmarks import it as `common`, a name too generic
    # to claim on sys.path for the whole test session.
    spec = importlib.util.spec_from_file_location("spillway_bench_common", BENCH / "common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


common = _load_common()


@pytest.fixture(params=[("local", "local"), ("local", "memory"), ("memory", "local")])
def pair(request, tmp_path) -> Iterator[tuple[str, str]]:
    memory: list[str] = []

    def make(kind: str) -> str:
        name = f"spillway-bench-{uuid.uuid4().hex}"
        if kind == "local":
            return str(tmp_path / name)
        memory.append(f"memory://{name}")
        return memory[-1]

    yield make(request.param[0]), make(request.param[1])
    for url in memory:
        fs, root = storage.open_root(url)
        storage.remove_tree(fs, root)


def _save(url: str, step: int) -> dict[str, bytes]:
    """Commit a checkpoint of random files through the real protocol; returns its contents."""
    fs, root = storage.open_root(url)
    files = {rel: os.urandom(n) for rel, n in FILES.items()}
    tmp = catalog.tmp_dir(root, step)
    for rel, data in files.items():
        path = storage.join(tmp, rel)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(data)
    manifest.build_manifest(fs, tmp, meta={"step": step})
    catalog.commit(fs, tmp, catalog.step_dir(root, step))
    return files


def test_plain_copy_copies_the_same_bytes_uncommitted(pair) -> None:
    src, dst = pair
    files = _save(src, 10)
    assert common.plain_copy(src, dst, 10) >= 0
    fs, root = storage.open_root(dst)
    assert catalog.committed_steps(fs, root) == []
    tmp = catalog.tmp_dir(root, 10)
    for rel, data in files.items():
        with fs.open(storage.join(tmp, rel), "rb") as f:
            assert f.read() == data
    manifest.verify(fs, tmp, check_hashes=True)
