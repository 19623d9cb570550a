"""Checkpoints through any fsspec URL; activation checkpointing, bf16 and compile as switches."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.integration.recipe_runs import REPO, ok, torchrun

pytestmark = pytest.mark.slow

SHORT = ("trainer.max_steps=6", "checkpoint.every_steps=3")


def test_resume_from_a_memory_store_in_one_process(tmp_path):
    done = subprocess.run(
        [sys.executable, "tests/integration/train_twice_in_memory.py", str(tmp_path / "run")],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["listing"] == ["step-000000002", "step-000000004"]
    assert result["steps"] == list(range(1, 9))
    assert "resumed from step 4" in done.stderr


def test_file_url_storage_outside_the_run_dir(tmp_path):
    store = tmp_path / "bucket"
    ok(
        torchrun(
            2,
            tmp_path / "run",
            *SHORT,
            f"checkpoint.storage=file://{store}",
            "trainer.stop_at_step=3",
        )
    )
    assert (store / "step-000000003" / "MANIFEST.json").is_file()
    assert not (tmp_path / "run" / "checkpoints").exists()
    resumed = ok(torchrun(1, tmp_path / "run", *SHORT, f"checkpoint.storage=file://{store}"))
    assert "resumed from step 3" in resumed.stderr


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return ok(torchrun(2, tmp_path_factory.mktemp("plain") / "run", *SHORT))


def test_activation_checkpointing_changes_no_number(plain, tmp_path):
    run = ok(torchrun(2, tmp_path / "run", *SHORT, "trainer.activation_checkpointing=true"))
    assert run.losses == plain.losses


def test_bf16_params_with_fp32_reduction_track_fp32(plain, tmp_path):
    run = ok(torchrun(2, tmp_path / "run", *SHORT, "trainer.param_dtype=bf16"))
    for step, loss in plain.losses.items():
        assert run.losses[step] != loss or step == 1
        assert abs(run.losses[step] - loss) / loss < 1e-3


def test_compiled_blocks_track_eager(plain, tmp_path):
    run = ok(torchrun(2, tmp_path / "run", *SHORT, "trainer.compile=true", timeout=400))
    for step, loss in plain.losses.items():
        assert abs(run.losses[step] - loss) / loss < 1e-4
