"""A resumed job logs to the same wandb run: the run id travels inside the checkpoint."""

from __future__ import annotations

import json

import pytest

from tests.integration.recipe_runs import ok, torchrun

pytestmark = pytest.mark.slow


def test_resumed_run_keeps_its_wandb_run_id(tmp_path):
    run_dir = tmp_path / "run"
    ok(torchrun(2, run_dir, "logger=wandb", "trainer.max_steps=6", "trainer.stop_at_step=3"))
    saved = json.loads(
        (run_dir / "checkpoints" / "step-000000003" / "trainer_state.json").read_text()
    )
    run_id = saved["run_id"]

    ok(torchrun(1, run_dir, "logger=wandb", "trainer.max_steps=6"))
    offline_runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2, offline_runs
    assert all(name.endswith(f"-{run_id}") for name in offline_runs), (run_id, offline_runs)
