"""`spillway run`: bad input is refused before anything starts; good input trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from orchestrator.rundir import RunDir
from tests.integration.recipe_runs import REPO


def spillway(*args: str, home, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, SPILLWAY_HOME=str(home))
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


# Through the real command, one case of each kind; tests/unit/test_config.py has every rule.
@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["trainer.foo=1"], "trainer.foo: no such key (allowed: max_steps,"),
        (["+optim.momentum=0.9"], "optim.momentum: no such key"),
        (["model=huge"], "model: no option 'huge' (allowed: 1b, 8b, small, tiny)"),
        (["trainer.max_steps=abc"], "trainer.max_steps: Value 'abc'"),
        (
            ["trainer.global_batch_size=7"],
            "trainer.global_batch_size: 7 does not divide over 2 ranks",
        ),
        (["data=memmap", "data.seq_len=64", "data.vocab_size=256"], "data.path: is required"),
    ],
)
def test_bad_config_is_refused_with_one_line(tmp_path, overrides, named):
    home = tmp_path / "home"
    done = spillway("run", *overrides, home=home)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("spillway: bad config: "), done.stderr
    assert named in lines[0]
    assert "Traceback" not in done.stderr
    assert not home.exists(), "nothing may be written for a refused config"


def test_recipe_entry_point_refuses_bad_config_alone(tmp_path):
    env = dict(os.environ, SPILLWAY_HOME=str(tmp_path / "home"))
    done = subprocess.run(
        [sys.executable, "-m", "recipes.gpt.train", "trainer.stop_at_step=0"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "spillway: bad config: trainer.stop_at_step: must be null or in 1..300, got 0"
    )
    assert not (tmp_path / "home").exists()


@pytest.mark.slow
def test_run_trains_on_repo_text_and_resumes(tmp_path):
    home = tmp_path / "home"
    args = ["run", "trainer.max_steps=8", "trainer.log_every=4", "checkpoint.every_steps=4"]
    first = spillway(*args, "trainer.stop_at_step=4", home=home)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = home / "runs" / "gpt-tiny-repo_text"
    assert f"run dir {run_dir}" in first.stderr
    (corpus,) = (home / "tmp" / "spillway-data").glob("repo_text-*.bin")
    assert corpus.stat().st_size > 50_000

    second = spillway(*args, home=home)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 4: 2 rank(s)" in second.stderr
    assert "step      8/8  loss" in second.stderr
    records = RunDir(str(run_dir)).read_metrics()
    # trainer.log_every=4: a line on each attempt's first step, every 4th (here the saves)
    assert [r["step"] for r in records] == [1, 4, 5, 8]
    assert {"step", "loss", "lr", "world_size", "tokens_per_s"} <= set(records[-1])
    assert all(r["world_size"] == 2 for r in records)
    state = json.loads(
        (run_dir / "checkpoints" / "step-000000008" / "trainer_state.json").read_text()
    )
    assert state["step"] == 8 and state["data_position"] == 8
