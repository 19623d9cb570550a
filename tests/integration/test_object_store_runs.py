"""`spillway run` with its run dir on an object store (a real S3 server on 127.0.0.1) and in
memory: metrics segments, drain files and committed checkpoints all go through fsspec."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.storage import open_root
from orchestrator.rundir import RunDir
from tests.integration.recipe_runs import BASE, REPO, ok, torchrun

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A moto S3 server in a process of its own, and the standard AWS variables that reach it."""
    port = _free_port()
    log = (tmp_path_factory.mktemp("s3") / "moto.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "spillway-test",
        "AWS_SECRET_ACCESS_KEY": "spillway-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "moto did not start"
                time.sleep(0.1)
        yield env
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


def spillway_run(*overrides: str, home, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", *BASE, *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=240,
        env={**os.environ, **env, "SPILLWAY_HOME": str(home)},
    )  # fmt: skip


def test_run_dir_on_s3_trains_stops_and_resumes_exactly(tmp_path, s3_env, monkeypatch):
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    fs, _ = open_root("s3://spillway-runs")
    fs.mkdir("spillway-runs")
    url = "s3://spillway-runs/jobs/j1/attempt-1"
    home = tmp_path / "home"

    first = spillway_run(f"run_dir={url}", "trainer.stop_at_step=6", home=home, env=s3_env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (REPO / "s3:").exists() and not (home / "s3:").exists()
    ckpt_fs, root = open_root(f"{url}/checkpoints")
    assert catalog.committed_steps(ckpt_fs, root) == [6, 3]
    # In place: no .tmp dir was ever renamed on the bucket, the manifest committed it.
    assert not [p for p in ckpt_fs.ls(root, detail=False) if p.endswith(".tmp")]

    second = spillway_run(f"run_dir={url}", home=home, env=s3_env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 6: 2 rank(s)" in second.stderr
    records = RunDir(url).read_metrics()
    assert [r["step"] for r in records] == list(range(1, 13))
    assert RunDir(url).last_save()["step"] == 12

    reference = ok(torchrun(2, tmp_path / "ref"))
    assert {r["step"]: r["loss"] for r in records} == reference.losses  # bit for bit


def test_run_dir_in_memory_trains_in_one_process_and_is_refused_for_two(tmp_path):
    home = tmp_path / "home"
    one = spillway_run("resources.devices=1", "run_dir=memory://solo/run", home=home, env={})
    assert one.returncode == 0, one.stderr[-3000:]
    assert "step     12/12" in one.stderr or "step 12" in one.stderr, one.stderr[-2000:]

    two = spillway_run("run_dir=memory://solo/run", home=tmp_path / "home2", env={})
    assert two.returncode == 2
    lines = two.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spillway: bad config: run_dir: memory://")
    assert not (tmp_path / "home2").exists()
