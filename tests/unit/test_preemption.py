"""Preemption: the fewest lower-priority jobs to drain so that a higher-priority one fits, on
every tick, after placement."""

from __future__ import annotations

from orchestrator.scheduling import ClusterSnapshot, JobRequest, Placement, place
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


# ---- every tick, after placement ------------------------------------------------------------


def test_a_job_placed_this_tick_needs_no_preemption():
    free_home = ClusterSnapshot("home", "owned", "cpu", 4, 2, 0.0)
    waiting = [job("urgent", 5)]
    decided = place(waiting, [free_home], NOW)
    assert isinstance(decided[0], Placement)
    running = [Running("low", "home", 2, 0, 1.0)]
    assert preemptions(waiting, running, [free_home], NOW, decided) == []


def test_devices_placed_this_tick_are_not_counted_as_free():
    half_free = ClusterSnapshot("home", "owned", "cpu", 4, 2, 0.0)
    waiting = [job("urgent", 5, sizes=(4,)), job("first", 6, sizes=(2,))]
    running = [Running("low", "home", 2, 0, 1.0)]
    decided = place(waiting, [half_free], NOW)
    assert decided[0] == Placement("first", "home", 2, 0.0)
    # "first" has the two free devices now: draining "low" would free two of the four needed.
    assert preemptions(waiting, running, [half_free], NOW, decided) == []
    # Blind to this tick's placement, the same two devices would be counted twice.
    assert preemptions(waiting, running, [half_free], NOW) == [
        Preemption("urgent", "home", ("low",))
    ]


def test_no_preemption_on_a_cluster_while_a_drain_there_is_in_flight():
    running = [Running("low", "home", 2, 0, 1.0), Running("low2", "home", 2, 0, 2.0)]
    waiting = [job("urgent", 5, sizes=(4,))]
    assert preemptions(waiting, running, [HOME], NOW, returning={"home": 2}) == []
    # Drains elsewhere do not hold it back.
    assert preemptions(waiting, running, [HOME], NOW, returning={"lease": 2}) == [
        Preemption("urgent", "home", ("low2", "low"))
    ]


def test_a_job_the_returning_devices_will_fit_gets_no_second_set_of_victims_elsewhere():
    running = [Running("low-home", "home", 2, 0, 1.0), Running("low-lease", "lease", 2, 0, 1.0)]
    waiting = [job("urgent", 5, sizes=(2,)), job("next", 4, sizes=(2,))]
    found = preemptions(waiting, running, [HOME, LEASE], NOW, returning={"home": 2})
    # "urgent" takes the two coming back on home; "next" is the one that drains the lease.
    assert found == [Preemption("next", "lease", ("low-lease",))]


def test_a_cluster_held_for_the_head_of_the_queue_is_not_drained_for_a_lower_priority():
    full = ClusterSnapshot("home", "owned", "cpu", 4, 0, 0.0)
    running = [Running("top", "home", 2, 10, 1.0), Running("low", "home", 2, 0, 2.0)]
    waiting = [job("head", 9, sizes=(4,)), job("mid", 5, sizes=(2,))]
    decided = place(waiting, [full], NOW)
    assert [d.holds for d in decided] == ["home", None]
    # "head" cannot get 4 (top outranks it); "mid" would fit if "low" drained, but what
    # "low" frees would be held for "head": draining it would help nobody.
    assert preemptions(waiting, running, [full], NOW, decided) == []
    assert preemptions(waiting, running, [full], NOW) == [Preemption("mid", "home", ("low",))]


def test_a_job_backing_off_preempts_nobody():
    running = [Running("low", "home", 2, 0, 1.0)]
    waiting = [JobRequest("urgent", (2,), priority=5, not_before=NOW + 30, failures=2)]
    assert preemptions(waiting, running, [HOME], NOW) == []
