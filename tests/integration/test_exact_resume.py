"""Stop, resume on the same or another world size: the losses continue as if never stopped."""

from __future__ import annotations

import shutil

import pytest

from tests.integration.recipe_runs import ok, torchrun

pytestmark = pytest.mark.slow

REL_TOL = 1e-5


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: 2 ranks, 12 steps, never stopped."""
    return ok(torchrun(2, tmp_path_factory.mktemp("ref") / "run"))


@pytest.fixture(scope="module")
def stopped_on_two(tmp_path_factory):
    """2 ranks stopped after step 6; tests copy it before resuming."""
    run = ok(torchrun(2, tmp_path_factory.mktemp("stop2") / "run", "trainer.stop_at_step=6"))
    assert sorted(run.losses) == list(range(1, 7))
    return run


def resume_copy(stopped, tmp_path, nproc: int, *overrides: str):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped.run_dir, run_dir)
    return ok(torchrun(nproc, run_dir, *overrides))


def test_resume_on_same_world_size_is_bit_identical(uninterrupted, stopped_on_two, tmp_path):
    resumed = resume_copy(stopped_on_two, tmp_path, 2)
    assert "resumed from step 6" in resumed.stderr
    assert sorted(resumed.losses) == list(range(1, 13))
    assert resumed.losses == uninterrupted.losses  # exact float equality, every step


def test_resume_two_to_one_rank(uninterrupted, stopped_on_two, tmp_path):
    resumed = resume_copy(stopped_on_two, tmp_path, 1)
    assert "resumed from step 6: 1 rank(s)" in resumed.stderr
    for step in range(7, 13):
        assert rel_err(resumed.losses[step], uninterrupted.losses[step]) <= REL_TOL, step


def test_resume_one_to_two_ranks(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    ok(torchrun(1, run_dir, "trainer.stop_at_step=6"))
    resumed = ok(torchrun(2, run_dir))
    assert "resumed from step 6: 2 rank(s)" in resumed.stderr
    assert sorted(resumed.losses) == list(range(1, 13))
    for step in range(1, 13):
        assert rel_err(resumed.losses[step], uninterrupted.losses[step]) <= REL_TOL, step


def test_async_save_resumes_bit_identically(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    ok(torchrun(2, run_dir, "checkpoint.async_save=true", "trainer.stop_at_step=6"))
    resumed = ok(torchrun(2, run_dir, "checkpoint.async_save=true"))
    assert "resumed from step 6" in resumed.stderr
    assert resumed.losses == uninterrupted.losses


def test_finished_run_has_nothing_left_to_do(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted.run_dir, run_dir)
    again = ok(torchrun(2, run_dir))
    assert "resumed from step 12" in again.stderr
    assert again.losses == uninterrupted.losses
