"""Driving the real Controller on the in-memory fleet (tests/fake_cluster.py): launching a
job, waiting for it, and the checks every run must pass. Shared by the controller's tests."""

from __future__ import annotations

import functools

from omegaconf import DictConfig

from orchestrator.config import compose_run
from orchestrator.controller.job_states import TERMINAL, JobState
from orchestrator.controller.paths import run_files
from orchestrator.controller.requests import submit_job
from tests.fake_cluster import FakeFleet, loss_at

BASE = ("data=synthetic", "trainer.max_steps=12", "checkpoint.every_steps=5", "checkpoint.keep=2")


@functools.lru_cache(maxsize=16)
def composed(overrides: tuple[str, ...]) -> DictConfig:
    return compose_run(list(overrides))


def launch(controller, fleet: FakeFleet, *overrides: str) -> str:
    cfg = composed(BASE + overrides)
    return submit_job(controller.state, cfg, list(overrides), fleet.clock())


def state_of(controller, job_id: str) -> JobState:
    return controller.state.get_job(job_id).state


def finished(controller, job_id: str):
    return lambda: state_of(controller, job_id) in TERMINAL


def every_step_once(fleet: FakeFleet, controller, job_id: str) -> list[dict]:
    """The metrics of every attempt, in order; each step's loss is the uninterrupted one's."""
    lines = []
    for a in controller.state.attempts(job_id):
        view = fleet.clusters[a.cluster].view()
        lines += run_files(view, job_id, a.attempt).read_metrics()
    assert all(r["loss"] == loss_at(r["step"]) for r in lines)
    return lines


def live_attempts(fleet: FakeFleet, job_id: str) -> list:
    """The job's attempts still running on some cluster, whatever the controller thinks."""
    return [
        a for cluster in fleet.clusters.values() for a in cluster.live() if a.spec.job_id == job_id
    ]


def run_checked(fleet: FakeFleet, controller, job_id: str, max_s: float = 300.0) -> None:
    """Tick until the job ends, checking after every tick that it never runs twice."""

    def done() -> bool:
        assert len(live_attempts(fleet, job_id)) <= 1, live_attempts(fleet, job_id)
        return finished(controller, job_id)()

    fleet.run_until(controller, done, max_s=max_s)
