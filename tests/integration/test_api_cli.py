"""The `spillway` command as a subprocess whose SPILLWAY_HOME holds only a client.json (a URL
and a copy of the token), against a real controller and its API in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.controller.paths import run_files
from orchestrator.fleet.local import free_ports
from tests.api_controller import Running, start

REPO = Path(__file__).resolve().parents[2]
TINY = ["data=synthetic", "data.seq_len=32", "trainer.max_steps=20"]


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory):
    controller = start(tmp_path_factory.mktemp("api-cli"), poll_s=60.0)
    yield controller
    controller.actor.close()


@pytest.fixture(scope="module")
def laptop(running: Running, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return running.client_home(tmp_path_factory.mktemp("laptop"))


def spillway(home: Path, *args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    tmp = Path(os.environ["TMPDIR"])  # the session's, so the laptop home stays as it was
    env = dict(os.environ, SPILLWAY_HOME=str(home), TMPDIR=str(tmp))
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def listing(home: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(home)): p.read_bytes() for p in sorted(home.rglob("*")) if p.is_file()
    }


def refused(done: subprocess.CompletedProcess, words: str) -> None:
    """One line naming the problem, exit 2, no traceback."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spillway: "), done.stderr
    assert words in lines[0], lines[0]
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_launch_status_metrics_cancel_wait_from_a_client_only_home(
    running: Running, laptop: Path
) -> None:
    before = listing(laptop)
    done = spillway(laptop, "launch", *TINY, "run_name=laptop", "--json")
    assert done.returncode == 0, done.stderr
    job_id = json.loads(done.stdout)["job_id"]
    assert listing(laptop) == before, "a client-only home gets nothing written"
    assert not (laptop / "controller.db").exists()
    job = running.actor.controller.state.get_job(job_id)
    assert job is not None and job.name == "laptop"

    table = spillway(laptop, "status")
    assert table.returncode == 0 and job_id in table.stdout and "PENDING" in table.stdout
    info = json.loads(spillway(laptop, "status", job_id, "--json").stdout)
    assert info["job_id"] == job_id and info["state"] == "PENDING"
    assert {"attempts", "checkpoints", "events"} <= set(info)
    human = spillway(laptop, "status", job_id)
    assert human.returncode == 0 and human.stdout.startswith(f"{job_id}  laptop  PENDING")

    # Metrics as rank 0 would leave them in the attempt's run dir on home.
    controller = running.actor.controller
    attempt = controller.state.add_attempt(job_id, "home", 2, time.time())
    spool = run_files(controller.clusters()["home"], job_id, attempt.attempt).metrics_writer()
    for step in (1, 2):
        spool.write({"step": step, "loss": 4.0, "lr": 1e-3, "world_size": 2,
                     "tokens_per_s": 10.0, "time": time.time()})  # fmt: skip
    spool.close()
    lines = [
        json.loads(x) for x in spillway(laptop, "metrics", job_id, "--json").stdout.splitlines()
    ]
    assert [(r["step"], r["attempt"], r["cluster"]) for r in lines] == [
        (1, 1, "home"),
        (2, 1, "home"),
    ]
    assert "tokens/s" in spillway(laptop, "metrics", job_id).stdout

    waited = spillway(laptop, "wait", job_id, "--timeout", "1")
    assert waited.returncode == 124 and f"{job_id} not finished after 1s" in waited.stderr
    cancelled = spillway(laptop, "cancel", job_id)
    assert cancelled.returncode == 0 and cancelled.stdout.strip() == f"{job_id}: CANCELLED"
    assert spillway(laptop, "wait", job_id).returncode == 1, "wait exits 0 only on SUCCEEDED"
    assert listing(laptop) == before


def test_bad_requests_are_one_line_and_change_nothing(running: Running, laptop: Path) -> None:
    job_id = running.client().submit(
        json.loads(running.actor.controller.state.list_jobs()[0].run_config), []
    )
    before, jobs = listing(laptop), len(running.client().jobs())
    refused(spillway(laptop, "status", "j-nope"), "no job j-nope")
    refused(spillway(laptop, "migrate", job_id, "--to", "partner"), "only a running job migrates")
    refused(spillway(laptop, "migrate", job_id, "--to", "mars"), "--to mars: no cluster 'mars'")
    refused(spillway(laptop, "resume", job_id), "only a finished, failed or cancelled job resumes")
    refused(spillway(laptop, "logs", job_id), "has not started yet")
    refused(spillway(laptop, "launch", *TINY, "trainer.foo=1"), "bad config: trainer.foo")
    # Fits the fleet this CLI composed (a 4-device partner), not the controller's: refused there.
    refused(
        spillway(laptop, "launch", *TINY, "resources.devices=4"),
        "bad config: resources.devices: wants 4 devices",
    )
    assert listing(laptop) == before and len(running.client().jobs()) == jobs


def test_a_wrong_token_an_unreachable_url_and_plain_http_elsewhere(
    running: Running, tmp_path: Path
) -> None:
    jobs = len(running.client().jobs())
    wrong = running.client_home(tmp_path / "wrong")
    (wrong / "token").write_text("not-the-token")
    (port,) = free_ports(1)
    cases = [
        (wrong, "refused the token (401)"),
        (running.client_home(tmp_path / "gone", url=f"http://127.0.0.1:{port}"),
         f"cannot reach the controller at http://127.0.0.1:{port} ("),
        # .invalid never resolves: even a client that ignored the refusal would reach nobody.
        (running.client_home(tmp_path / "plain", url="http://controller.invalid:8080"),
         "refusing to send the controller's token over plain http to controller.invalid"),
    ]  # fmt: skip
    for home, words in cases:
        before = listing(home)
        for args in (("status",), ("cancel", "j-x"), ("launch", *TINY)):
            refused(spillway(home, *args), words)
        assert listing(home) == before
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "client.json").write_text(json.dumps({"url": "http://127.0.0.1:1", "tokn": "x"}))
    refused(spillway(broken, "status"), "client.json: tokn: no such key")
    assert len(running.client().jobs()) == jobs


def test_the_cli_never_loads_the_controller(laptop: Path) -> None:
    probe = (
        "import sys; from orchestrator.cli import main; code = main(['status']); "
        "print(sorted(m for m in sys.modules if m.startswith('orchestrator.controller')))"
    )
    env = dict(os.environ, SPILLWAY_HOME=str(laptop))
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, env=env,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_home_that_knows_no_controller(tmp_path: Path) -> None:
    table = spillway(tmp_path, "status")
    assert table.returncode == 0 and table.stdout.split() == [
        "job", "name", "state", "cluster", "world", "step", "cost", "why",
    ]  # fmt: skip
    refused(spillway(tmp_path, "cancel", "j-x"), "no controller known")
    assert listing(tmp_path) == {}, "finding a controller creates nothing"
