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


def _fleet_story(home: Path) -> str:
    """What a failed case's fleet was doing: its jobs as the controller has them, and the
    controller's own log (found among the home head's worker logs by its logger's name)."""
    from orchestrator.api.client import ApiClient
    from orchestrator.api.discovery import read_client_file

    lines = []
    try:
        client = ApiClient(read_client_file(str(home)))
        for listed in client.jobs():
            info = client.job(listed["job_id"])
            lines.append(f"{info['job_id']} {info['name']} {info['state']}: {info['reason']}")
            for a in info["attempts"]:
                lines.append(
                    f"  attempt {a['attempt']} on {a['cluster']} x{a['world_size']} "
                    f"{a['state']} steps {a['first_step']}-{a['last_step']}: "
                    f"{(a['exit_reason'] or '')[-400:]!r}"
                )
            lines.extend(
                f"  {e['at']:.1f} {e['to'] or e['kind']}: {e['cause']}" for e in info["events"]
            )
    except Exception as exc:  # the story is told as far as the fleet still answers
        lines.append(f"jobs not read: {exc!r}")
    for log in sorted(home.glob("ray/*/session_latest/logs/worker-*.err")):
        text = log.read_text(errors="replace")
        if "spillway.controller" in text:
            lines.append(f"--- {log}")
            lines.extend(text.splitlines()[-150:])
    return "\n".join(lines)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    home = getattr(item, "funcargs", {}).get("fleet_home")
    if report.when == "call" and report.failed and home is not None:
        report.sections.append(("the fleet at the failure", _fleet_story(home)))
    return report


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
