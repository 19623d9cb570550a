"""Preemption: the fewest lower-priority jobs to drain so that a higher-priority one fits."""

from __future__ import annotations

from orchestrator.scheduling import ClusterSnapshot, JobRequest
from orchestrator.scheduling.preemption import Preemption, Running, preemptions

NOW = 1_000.0
HOME = ClusterSnapshot("home", "owned", "cpu", 4, 0, 0.0)
LEASE = ClusterSnapshot("lease", "leased", "cpu", 4, 0, 2.0, lease_start=0.0, lease_end=1e9)


def job(job_id: str, priority: int, sizes=(2,), clusters=()) -> JobRequest:
    return JobRequest(job_id, tuple(sizes), clusters=tuple(clusters), priority=priority)


def test_the_lowest_priority_newest_job_is_drained_first_and_only_as_many_as_needed():
    running = [
        Running("old-low", "home", 2, 0, started_at=10.0),
        Running("new-low", "home", 2, 0, started_at=20.0),
    ]
    found = preemptions([job("urgent", 5)], running, [HOME], NOW)
    assert found == [Preemption("urgent", "home", ("new-low",))]


def test_equal_or_higher_priority_is_never_preempted():
    running = [Running("peer", "home", 2, 5, 1.0), Running("boss", "home", 2, 9, 2.0)]
    assert preemptions([job("urgent", 5)], running, [HOME], NOW) == []


def test_a_job_that_fits_without_moving_anyone_preempts_nobody():
    free_home = ClusterSnapshot("home", "owned", "cpu", 4, 2, 0.0)
    running = [Running("low", "home", 2, 0, 1.0)]
    assert preemptions([job("urgent", 5)], running, [free_home], NOW) == []


def test_several_victims_when_one_is_not_enough_and_none_twice():
    running = [Running(f"r{i}", "home", 1, 0, float(i)) for i in range(4)]
    found = preemptions([job("a", 5, sizes=(3,)), job("b", 4, sizes=(2,))], running, [HOME], NOW)
    assert found[0] == Preemption("a", "home", ("r3", "r2", "r1"))
    assert found[1:] == []  # only r0 is left for b, and one device is not enough


def test_the_jobs_preferred_clusters_are_respected():
    running = [Running("low-home", "home", 2, 0, 1.0), Running("low-lease", "lease", 2, 0, 1.0)]
    found = preemptions([job("urgent", 5, clusters=("lease",))], running, [HOME, LEASE], NOW)
    assert found == [Preemption("urgent", "lease", ("low-lease",))]
    assert preemptions([job("nowhere", 5, sizes=(8,))], running, [HOME, LEASE], NOW) == []
