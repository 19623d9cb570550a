"""The local fleet for end-to-end tests: real Ray heads, always brought down afterwards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


class Spillway:
    """Runs the `spillway` command against one state dir."""

    def __init__(self, home: Path) -> None:
        self.home = home

    def __call__(self, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
        env = dict(os.environ, SPILLWAY_HOME=str(self.home), TMPDIR=str(self.home / "tmp"))
        return subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", *args],
            cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env,
        )  # fmt: skip

    def json(self, *args: str) -> dict:
        done = self(*args, "--json")
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)


@pytest.fixture(scope="module")
def fleet_home() -> Iterator[Path]:
    # Short on purpose: Ray's unix socket paths under the state dir must stay within 107 bytes.
    home = Path(tempfile.mkdtemp(prefix="sw-", dir="/tmp"))
    (home / "tmp").mkdir()
    yield home
    Spillway(home)("fleet", "down")
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def spillway(fleet_home: Path) -> Spillway:
    return Spillway(fleet_home)
