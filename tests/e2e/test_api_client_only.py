"""A CLI whose SPILLWAY_HOME holds only a client.json (the controller's URL and a copy of its
token, no controller.db, no fleet records) drives a job on the local fleet to SUCCEEDED, and
`status`, `metrics` and `logs` show it."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Spillway

pytestmark = pytest.mark.slow

TINY = ["data=synthetic", "data.seq_len=32", "checkpoint.every_steps=10"]


@pytest.fixture(scope="module")
def laptop(spillway: Spillway, fleet_home: Path) -> Iterator[Spillway]:
    # The fleet's own home starts the fleet and its controller with a first small job.
    first = spillway("launch", *TINY, "trainer.max_steps=5", "run_name=warmup", "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    assert spillway("wait", json.loads(first.stdout)["job_id"], "--timeout", "240").returncode == 0
    recorded = json.loads((fleet_home / "client.json").read_text())
    assert recorded["url"].startswith("http://127.0.0.1:") and recorded["fleet"] == "local"

    home = Path(tempfile.mkdtemp(prefix="sw-laptop-", dir="/tmp"))
    (home / "tmp").mkdir()
    shutil.copy(recorded["token_path"], home / "token")
    (home / "client.json").write_text(
        json.dumps({"url": recorded["url"], "token_path": str(home / "token")})
    )
    yield Spillway(home)
    shutil.rmtree(home, ignore_errors=True)


def test_a_client_only_home_drives_a_job_to_succeeded(laptop: Spillway) -> None:
    done = laptop("launch", *TINY, "trainer.max_steps=20", "run_name=laptop", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    job_id = json.loads(done.stdout)["job_id"]
    waited = laptop("wait", job_id, "--timeout", "240", timeout=300)
    assert waited.returncode == 0, waited.stderr[-2000:]

    info = laptop.json("status", job_id)
    assert info["state"] == "SUCCEEDED" and info["name"] == "laptop"
    assert [a["state"] for a in info["attempts"]][-1] == "SUCCEEDED"
    table = laptop("status")
    assert table.returncode == 0 and job_id in table.stdout and "SUCCEEDED" in table.stdout

    lines = [json.loads(x) for x in laptop("metrics", job_id, "--json").stdout.splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 21))
    logs = laptop("logs", job_id)
    assert logs.returncode == 0 and logs.stdout.strip(), logs.stderr

    # Nothing of the controller's ever landed in the laptop's home.
    assert sorted(p.name for p in laptop.home.iterdir()) == ["client.json", "tmp", "token"]
    assert not (laptop.home / "controller.db").exists()


def test_a_wrong_token_is_refused_in_one_line(laptop: Spillway, tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    data = json.loads((laptop.home / "client.json").read_text())
    (tmp_path / "token").write_text("not-the-token")
    (tmp_path / "client.json").write_text(
        json.dumps({**data, "token_path": str(tmp_path / "token")})
    )
    done = Spillway(tmp_path)("status")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused the token (401)" in lines[0], done.stderr
