"""The global batch of step s depends only on the seed and s, never on the world size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recipes.gpt.data import (
    BatchPlan,
    MemmapTokens,
    SyntheticTokens,
    build_repo_text_bin,
    micro_batches,
    repo_text_files,
)


@given(
    world=st.sampled_from([1, 2, 3, 4, 8]),
    per_rank=st.integers(1, 64),
    micro=st.integers(1, 80),
)
def test_batch_plan_splits_the_global_batch_exactly(world, per_rank, micro):
    plan = BatchPlan.for_world(world * per_rank, world, micro)
    assert plan.per_rank == per_rank
    assert plan.micro_batch <= micro and plan.per_rank % plan.micro_batch == 0
    assert plan.micro_batch * plan.accum_steps * world == world * per_rank
    rows = [r for rank in range(world) for r in plan.rank_rows(rank)]
    assert rows == list(range(world * per_rank))


def test_batch_plan_refuses_an_indivisible_global_batch():
    with pytest.raises(ValueError, match="does not divide"):
        BatchPlan.for_world(10, 4, 2)


def global_batch_seen_by(
    source, step: int, global_batch: int, world: int, micro: int
) -> torch.Tensor:
    plan = BatchPlan.for_world(global_batch, world, micro)
    parts = []
    for rank in range(world):
        for inputs, targets in micro_batches(source, step, plan, rank):
            assert torch.equal(inputs[:, 1:], targets[:, :-1])
            parts.append(torch.cat([inputs, targets[:, -1:]], dim=1))
    return torch.cat(parts)


@pytest.fixture
def token_file(tmp_path):
    def make(dtype: str) -> str:
        path = tmp_path / f"tokens.{dtype}.bin"
        np.arange(10_000, dtype=np.int64).astype(dtype).tofile(path)
        return str(path)

    return make


@pytest.mark.parametrize("kind", ["synthetic", "uint16", "uint32"])
def test_same_samples_on_any_world_size(kind, token_file):
    if kind == "synthetic":
        source = SyntheticTokens(vocab_size=256, seq_len=16, seed=3)
    else:
        source = MemmapTokens(token_file(kind), kind, seq_len=16, seed=3)
    for step in (1, 2, 57):
        reference = global_batch_seen_by(source, step, 8, world=1, micro=8)
        for world, micro in ((2, 1), (4, 2), (8, 1)):
            assert torch.equal(global_batch_seen_by(source, step, 8, world, micro), reference)


def test_steps_and_seeds_draw_different_batches():
    a = SyntheticTokens(256, 16, seed=1)
    b = SyntheticTokens(256, 16, seed=2)
    rows = range(8)
    assert not torch.equal(a.rows(1, 8, rows), a.rows(2, 8, rows))
    assert not torch.equal(a.rows(1, 8, rows), b.rows(1, 8, rows))
    assert torch.equal(a.rows(5, 8, rows), SyntheticTokens(256, 16, seed=1).rows(5, 8, rows))


def test_synthetic_sequences_are_learnable_progressions():
    rows = SyntheticTokens(vocab_size=100, seq_len=20, seed=0).rows(1, 4, range(4))
    assert rows.shape == (4, 21) and rows.max() < 100
    steps = (rows[:, 1:] - rows[:, :-1]) % 100
    assert (steps == steps[:, :1]).all()


def test_memmap_windows_are_contiguous_slices_of_the_file(token_file):
    source = MemmapTokens(token_file("uint32"), "uint32", seq_len=32, seed=0)
    rows = source.rows(4, 6, range(6))
    assert rows.dtype == torch.int64 and rows.shape == (6, 33)
    assert ((rows[:, 1:] - rows[:, :-1]) == 1).all()


@settings(max_examples=10, deadline=None)
@given(seq_len=st.integers(2, 64))
def test_memmap_refuses_a_file_shorter_than_a_window(tmp_path_factory, seq_len):
    path = tmp_path_factory.mktemp("short") / "t.bin"
    np.zeros(seq_len + 1, dtype=np.uint16).tofile(path)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        MemmapTokens(str(path), "uint16", seq_len=seq_len, seed=0)


def test_repo_text_corpus_is_the_repository_bytes(tmp_path):
    files = repo_text_files()
    names = {p.name for p in files}
    assert {"rundir.py", "train.py", "train.yaml"} <= names
    assert "orchestrator" in files[0].parts and "recipes" in files[-1].parts
    out = tmp_path / "corpus.bin"
    n = build_repo_text_bin(str(out))
    tokens = np.fromfile(out, dtype=np.uint16)
    assert len(tokens) == n and tokens.max() < 256
    first = files[0].read_bytes()
    assert first == tokens[: len(first)].astype(np.uint8).tobytes()
    # Built once: a second call reuses the file rather than rewriting it.
    mtime = out.stat().st_mtime_ns
    build_repo_text_bin(str(out))
    assert out.stat().st_mtime_ns == mtime
