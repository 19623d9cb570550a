"""Jobs through the controller on the local fleet: placement with spillover and return home,
preemption, cancel, bad input, a controller killed mid-job, resume, and a CLI that knows only
the controller's URL and token. Real Ray clusters, real training."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.backends.ray_jobs import RayJobsBackend
from orchestrator.controller.state import ControllerState
from orchestrator.fleet.processes import session_pids
from tests.e2e.conftest import Spillway
from tests.e2e.faults import cluster
from tests.e2e.helpers import JOB_WAIT_S, controller_beat, job, wait_for

pytestmark = pytest.mark.slow

TINY = ["data=synthetic", "data.seq_len=32", "checkpoint.every_steps=10"]


def launch(spillway, *overrides: str) -> str:
    done = spillway("launch", *TINY, *overrides, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)["job_id"]


def test_first_launch_starts_the_fleet_spills_the_second_job_and_brings_it_home(
    spillway, fleet_home
):
    first = spillway("launch", *TINY, "trainer.max_steps=60", "run_name=A", "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "starting the local fleet (home, partner)" in first.stderr
    assert "starting the controller on home" in first.stderr
    a = json.loads(first.stdout)["job_id"]
    # B spills to partner while A holds home, and moves home once A is done (return_home).
    b = launch(spillway, "trainer.max_steps=200", "run_name=B", "placement.return_home=true")

    for job_id in (a, b):
        waited = spillway("wait", job_id, "--timeout", str(JOB_WAIT_S), timeout=JOB_WAIT_S + 60)
        assert waited.returncode == 0, (job(spillway, job_id), waited.stderr[-2000:])
    where = {j: job(spillway, j)["attempts"] for j in (a, b)}
    assert [(x["cluster"], x["world_size"], x["state"]) for x in where[a]] == [
        ("home", 2, "SUCCEEDED")
    ]
    assert [(x["cluster"], x["world_size"], x["state"]) for x in where[b]] == [
        ("partner", 2, "DRAINED"),
        ("home", 2, "SUCCEEDED"),
    ]
    assert where[b][1]["steps_redone"] == 0
    events_b = [e["cause"] for e in job(spillway, b)["events"]]
    assert "placed on partner (leased) with 2 device(s)" in events_b
    assert "room on home (owned): leaving the lease on partner" in events_b
    assert job(spillway, b)["cost"] > 0 and job(spillway, a)["cost"] == 0

    for job_id, steps, where_ran in (
        (a, 60, {(1, "home")}),
        (b, 200, {(1, "partner"), (2, "home")}),
    ):
        lines = [json.loads(x) for x in spillway("metrics", job_id, "--json").stdout.splitlines()]
        assert [x["step"] for x in lines] == list(range(1, steps + 1))
        assert {(x["attempt"], x["cluster"]) for x in lines} == where_ran

    table = spillway("status").stdout
    assert a in table and b in table and "SUCCEEDED" in table


def test_preemption_then_cancel_stops_the_ray_job_and_frees_its_devices(spillway, fleet_home):
    c = launch(spillway, "trainer.max_steps=5000", "run_name=C", "placement.clusters=[home]")
    wait_for(lambda: job(spillway, c)["state"] == "RUNNING", what="C running")
    # A job of higher priority that only home will do: C drains for it, and waits.
    p = launch(
        spillway,
        "trainer.max_steps=30",
        "run_name=P",
        "placement.clusters=[home]",
        "placement.priority=5",
    )
    assert (
        spillway("wait", p, "--timeout", str(JOB_WAIT_S), timeout=JOB_WAIT_S + 60).returncode == 0
    )
    assert [(a["cluster"], a["state"]) for a in job(spillway, p)["attempts"]] == [
        ("home", "SUCCEEDED")
    ]

    def resumed():
        attempts = job(spillway, c)["attempts"]
        return len(attempts) == 2 and attempts[1]["state"] == "RUNNING" and attempts

    first, _ = wait_for(resumed, what="C back on home after P")
    info = job(spillway, c)
    assert first["state"] == "DRAINED"
    assert (
        f"preempted on home by {p} (priority 5 over 0); back to the queue with its checkpoint"
        in [e["cause"] for e in info["events"]]
    )
    second = wait_for(lambda: (a := job(spillway, c)["attempts"][1])["first_step"] and a)
    assert second["first_step"] == first["last_step"] + 1, "a preemption loses no step"
    ray_job_id = second["ray_job_id"]

    done = spillway("cancel", c)
    assert done.returncode == 0 and "CANCELLED" in done.stdout
    attempt = wait_for(
        lambda: (
            job(spillway, c)["attempts"][1]["state"] == "STOPPED"
            and job(spillway, c)["attempts"][1]
        )
    )
    assert attempt["exit_reason"] == "cancelled by the user"

    home = next(v for v in _views(fleet_home) if v.name == attempt["cluster"])
    backend = RayJobsBackend(home)
    wait_for(lambda: str(backend.status(ray_job_id)) == "STOPPED", what="the Ray job stopped")
    free = wait_for(
        lambda: (
            next(x for x in spillway.json("fleet", "status")["clusters"] if x["name"] == home.name)[
                "devices_free"
            ]
            == home.devices
        ),
        what="devices freed",
    )
    assert free
    assert spillway("wait", c).returncode == 1


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["trainer.foo=1"], "trainer.foo: no such key"),
        (["fleet=nope"], "fleet: no option 'nope' (allowed: example_partner, local)"),
        (
            ["resources.devices=8", "trainer.global_batch_size=16"],
            "resources.devices: wants 8 devices; the largest accepted cluster (partner) has 4",
        ),
        (["placement.clusters=[mars]"], "placement.clusters"),
    ],
)
def test_bad_launches_submit_nothing(spillway, fleet_home, overrides, words):
    before = spillway.json("status")["jobs"]
    done = spillway("launch", *TINY, *overrides)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spillway: bad config: "), done.stderr
    assert words in lines[0]
    assert spillway.json("status")["jobs"] == before


def test_resume_continues_a_finished_job_from_its_checkpoint(spillway, fleet_home):
    e = launch(spillway, "trainer.max_steps=20", "run_name=E")
    assert (
        spillway("wait", e, "--timeout", str(JOB_WAIT_S), timeout=JOB_WAIT_S + 60).returncode == 0
    )
    done = spillway("resume", e, "trainer.max_steps=40")
    assert done.returncode == 0 and "PENDING" in done.stdout
    assert (
        spillway("wait", e, "--timeout", str(JOB_WAIT_S), timeout=JOB_WAIT_S + 60).returncode == 0
    )
    attempts = job(spillway, e)["attempts"]
    assert [x["state"] for x in attempts] == ["SUCCEEDED", "SUCCEEDED"]
    assert attempts[1]["cluster"] == attempts[0]["cluster"]
    assert (attempts[1]["first_step"], attempts[1]["last_step"]) == (21, 40)
    assert spillway("resume", e, "trainer.max_step=50").returncode == 2


def test_a_job_moved_to_another_cluster_takes_its_checkpoint_along(spillway, fleet_home):
    f = launch(spillway, "trainer.max_steps=20", "run_name=F")
    assert (
        spillway("wait", f, "--timeout", str(JOB_WAIT_S), timeout=JOB_WAIT_S + 60).returncode == 0
    )
    first = job(spillway, f)["attempts"][0]
    other, devices = ("partner", 4) if first["cluster"] == "home" else ("home", 2)
    moved = spillway(
        "resume",
        f,
        "trainer.max_steps=40",
        f"placement.clusters=[{other}]",
        f"resources.devices={devices}",
    )
    assert moved.returncode == 0, moved.stderr
    assert (
        spillway("wait", f, "--timeout", str(JOB_WAIT_S), timeout=JOB_WAIT_S + 60).returncode == 0
    )
    info = job(spillway, f)
    second = info["attempts"][1]
    assert (second["cluster"], second["world_size"], second["state"]) == (
        other,
        devices,
        "SUCCEEDED",
    )
    assert (second["first_step"], second["last_step"]) == (21, 40), (
        "resumed from the copied checkpoint"
    )
    migrations = [e["cause"] for e in info["events"] if e["kind"] == "migrate"]
    assert len(migrations) == 1, migrations
    assert migrations[0].startswith(f"copied checkpoint step 20 from {first['cluster']} to {other}")
    assert migrations[0].endswith("verified")


# The load case is 500 jobs; the suite runs fewer to stay within its time budget on two
# cores (each real attempt costs a driver, a rank actor and torch's import). SPILLWAY_LOAD_JOBS=500
# runs the full size; docs/benchmarks.md records that run.
LOAD_JOBS = int(os.environ.get("SPILLWAY_LOAD_JOBS", "6"))


def test_a_burst_of_jobs_through_a_controller_killed_twice_each_succeeds_once(spillway, fleet_home):
    from concurrent.futures import ThreadPoolExecutor
    from itertools import pairwise

    from omegaconf import OmegaConf

    from orchestrator.api.client import ApiClient, ApiError
    from orchestrator.api.discovery import read_client_file
    from orchestrator.config import compose_run

    overrides = ["trainer.max_steps=3", "checkpoint.every_steps=3", "resources.devices=1"]
    first = launch(spillway, *overrides)  # the CLI's way: starts the fleet if it is down
    overrides = [*TINY, *overrides]
    cfg = OmegaConf.to_container(compose_run([f"state_dir={fleet_home}", *overrides]))
    client = ApiClient(read_client_file(str(fleet_home)), timeout_s=60)
    with ThreadPoolExecutor(8) as pool:  # the rest all at once, as many clients would
        ids = [first, *pool.map(lambda _: client.submit(cfg, overrides), range(LOAD_JOBS - 1))]
    assert len(set(ids)) == LOAD_JOBS

    def done() -> int:
        try:
            jobs = client.jobs()
        except ApiError:  # the controller is coming back
            return -1
        return sum(j["state"] == "SUCCEEDED" for j in jobs if j["job_id"] in ids)

    running_at_a_kill: set[str] = set()
    for share in (3, 3 / 2):  # killed after a third of the jobs finished, then two thirds
        wait_for(lambda s=share: done() >= LOAD_JOBS / s, timeout_s=60 + 6 * LOAD_JOBS)
        old_pid, _, _ = controller_beat(fleet_home)
        running_at_a_kill |= {j["job_id"] for j in client.jobs() if j["state"] == "RUNNING"}
        os.kill(old_pid, signal.SIGKILL)
        wait_for(lambda p=old_pid: (b := controller_beat(fleet_home)) and b[0] != p)
    wait_for(lambda: done() == LOAD_JOBS, timeout_s=60 + 6 * LOAD_JOBS, poll_s=2)
    assert running_at_a_kill, "no job was running when the controller was killed"

    submitted = {}
    for view in _views(fleet_home):
        for sid in RayJobsBackend(view).list():
            submitted.setdefault(sid, []).append(view.name)
    with ControllerState.open(fleet_home / "controller.db") as state:
        for job_id in ids:
            attempts = state.attempts(job_id)
            moves = [e for e in state.events(job_id) if e.kind == "state"]
            # Exactly one success, and an unbroken chain of moves: no event lost.
            assert [e.to_state.value for e in moves].count("SUCCEEDED") == 1, moves
            assert all(a.from_state == b.to_state for b, a in pairwise(moves)), moves
            # Each attempt reached one cluster once, under its own id; nothing else ran.
            mine = sorted(sid for sid in submitted if sid.startswith(f"{job_id}-a"))
            assert mine == sorted(a.ray_job_id for a in attempts if a.ray_job_id), (mine, attempts)
            assert all(len(submitted[sid]) == 1 for sid in mine)
            if job_id in running_at_a_kill:  # its attempt ran on through the controller's death
                assert len(attempts) == 1, attempts


def _views(home):
    from orchestrator.config import compose_run
    from orchestrator.fleet import fleet as fleet_mod

    cfg = compose_run([f"state_dir={home}"])
    return fleet_mod.resolve(cfg.fleet, str(home))


# ---- a CLI whose SPILLWAY_HOME holds only a client.json (the controller's URL and a copy of its
# token: no controller.db, no fleet records) drives a job on this fleet -------------------------


@pytest.fixture(scope="module")
def laptop(spillway: Spillway, fleet_home: Path) -> Iterator[Spillway]:
    # The fleet's own home starts the fleet and its controller with a first small job.
    first = spillway("launch", *TINY, "trainer.max_steps=5", "run_name=warmup", "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (
        spillway(
            "wait",
            json.loads(first.stdout)["job_id"],
            "--timeout",
            str(JOB_WAIT_S),
            timeout=JOB_WAIT_S + 60,
        ).returncode
        == 0
    )
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
    waited = laptop("wait", job_id, "--timeout", str(JOB_WAIT_S), timeout=JOB_WAIT_S + 60)
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


def test_fleet_down_leaves_no_process(spillway, fleet_home):
    assert spillway("fleet", "up").returncode == 0  # up already, unless this test runs alone
    clusters = [cluster(fleet_home, n) for n in ("home", "partner")]
    assert spillway("fleet", "down").returncode == 0
    for c in clusters:
        assert session_pids(c.session_id) == [], c.name
