"""Every test's state (runs, data, temp files) lives under a temporary SPILLWAY_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Under `-n 2` (pyproject.toml) each end-to-end module runs whole on one worker, its cases
    in order: they share that module's fleet. The largest modules start first, one on each
    worker, and every other test is spread over both, test by test."""
    from xdist.scheduler import LoadScopeScheduling

    class EndToEndModulesWhole(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return nodeid.split("::")[0] if nodeid.startswith("tests/e2e/") else nodeid

    return EndToEndModulesWhole(config, log)


@pytest.fixture(scope="session", autouse=True)
def spillway_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("spillway_home")
    (home / "tmp").mkdir()
    old = {
        k: os.environ.get(k) for k in ("SPILLWAY_HOME", "TMPDIR", "WANDB_MODE", "OMP_NUM_THREADS")
    }
    os.environ.update(
        SPILLWAY_HOME=str(home), TMPDIR=str(home / "tmp"), WANDB_MODE="offline", OMP_NUM_THREADS="1"
    )
    yield home
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
