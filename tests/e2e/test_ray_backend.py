"""One attempt through the Ray Jobs API: placement group, rank actors, the recipe, metrics."""

from __future__ import annotations

import dataclasses
import time

import pytest
from omegaconf import OmegaConf

from orchestrator.backends.base import TERMINAL
from orchestrator.backends.ray_jobs import RayJobsBackend
from orchestrator.config import compose_run
from orchestrator.exit_codes import NO_CAPACITY
from orchestrator.fleet import fleet as fleet_mod
from orchestrator.rundir import RunDir
from orchestrator.runtime.spec import AttemptSpec, attempt_run_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clusters(spillway, fleet_home, monkeypatch_module):
    assert spillway("fleet", "up").returncode == 0
    monkeypatch_module.setenv("SPILLWAY_HOME", str(fleet_home))
    cfg = compose_run([])
    return {v.name: v for v in fleet_mod.resolve(cfg.fleet, cfg.state_dir)}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def spec_for(cluster, job_id: str, world_size: int, steps: int = 6) -> AttemptSpec:
    """An attempt as the controller hands it over: its run config in its run dir first."""
    root = f"{cluster.storage_root}/jobs/{job_id}"
    overrides = ["data=synthetic", "data.seq_len=32", f"trainer.max_steps={steps}"]
    stored = OmegaConf.to_container(compose_run([*overrides, "checkpoint.every_steps=3"]))
    cfg = attempt_run_config(stored, world_size, f"{root}/attempt-1", f"{root}/checkpoints")
    RunDir(f"{root}/attempt-1", cluster.storage_options).write_run_config(cfg)
    return AttemptSpec(
        job_id=job_id,
        attempt=1,
        world_size=world_size,
        device_resource=cluster.device_resource,
        run_dir=f"{root}/attempt-1",
    )


def wait_terminal(backend: RayJobsBackend, ray_job_id: str, timeout_s: float = 180):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = backend.status(ray_job_id)
        if status in TERMINAL:
            return status
        time.sleep(0.5)
    raise AssertionError(f"{ray_job_id} still {status} after {timeout_s}s")


def test_attempt_trains_on_home_and_is_submitted_once(clusters):
    home = RayJobsBackend(clusters["home"])
    spec = spec_for(clusters["home"], "jhome", world_size=2)
    ray_job_id = home.submit(spec)
    assert ray_job_id == "jhome-a1"
    with pytest.raises(Exception, match="already"):
        home.submit(spec)
    assert str(wait_terminal(home, ray_job_id)) == "SUCCEEDED", home.logs(ray_job_id)[-3000:]
    records = RunDir(f"{clusters['home'].storage_root}/jobs/jhome/attempt-1").read_metrics()
    assert [r["step"] for r in records] == list(range(1, 7))
    assert {r["world_size"] for r in records} == {2}
    logs = home.logs(ray_job_id)
    assert "reserved 2 device(s) on 1 node(s)" in logs and "committed checkpoint step 6" in logs


def test_a_gang_that_cannot_be_reserved_fails_with_its_own_exit_code(clusters):
    home = RayJobsBackend(clusters["home"])
    spec = dataclasses.replace(
        spec_for(clusters["home"], "jtoobig", world_size=3), reserve_timeout_s=3
    )
    ray_job_id = home.submit(spec)
    assert str(wait_terminal(home, ray_job_id)) == "FAILED"
    info = home.info(ray_job_id)
    assert info.exit_code == NO_CAPACITY and f"exit code {NO_CAPACITY}" in info.message, info
    assert "could not reserve 3 x spillway_device" in home.logs(ray_job_id)


def test_the_partner_refuses_a_submission_without_its_token(clusters):
    no_token = dataclasses.replace(clusters["partner"], token=None)
    with pytest.raises(Exception, match="(?i)unauthorized|authentication|401"):
        RayJobsBackend(no_token).submit(spec_for(clusters["partner"], "jnotoken", world_size=1))
    wrong = dataclasses.replace(clusters["partner"], token=clusters["home"].token)
    with pytest.raises(Exception, match="(?i)unauthorized|authentication|401"):
        RayJobsBackend(wrong).submit(spec_for(clusters["partner"], "jwrongtoken", world_size=1))
    assert RayJobsBackend(clusters["partner"]).list() == []
