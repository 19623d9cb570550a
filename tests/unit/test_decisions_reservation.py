"""Head-of-queue reservation: the first job that waits for devices alone holds its cluster's
free devices against lower priorities, so a stream of small jobs cannot starve a big one."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.scheduling import (
    LEASED,
    OWNED,
    ClusterSnapshot,
    JobRequest,
    Placement,
    Wait,
    place,
)

NOW = 1_000.0


def cluster(name: str, free: int, total: int = 4, kind: str = OWNED, **kw) -> ClusterSnapshot:
    if kind == LEASED:
        kw = {"lease_start": 0.0, "lease_end": 1e9, **kw}
    return ClusterSnapshot(name, kind, "cpu", total, free, 0.0, **kw)


def job(job_id: str, size: int, priority: int = 0, **kw) -> JobRequest:
    return JobRequest(job_id, (size,), priority=priority, **kw)


def by_id(decisions) -> dict:
    return {d.job_id: d for d in decisions}


def test_the_big_job_holds_its_cluster_and_small_lower_priority_jobs_wait():
    d = by_id(place([job("big", 4, priority=1), job("small", 1)], [cluster("home", 3)], NOW))
    assert d["big"] == Wait(
        "big", "home: fewer than 4 devices free (of 4)", {"devices_free": 3}, holds="home"
    )
    assert d["small"] == Wait(
        "small",
        "home: free devices held for big (priority 1), first in the queue",
        {"devices_free": 3},
    )


def test_lower_priorities_may_still_use_other_clusters():
    fleet = [cluster("home", 3), cluster("side", 2)]
    d = by_id(place([job("big", 4, priority=1), job("small", 1)], fleet, NOW))
    assert d["big"].holds == "home"
    assert d["small"] == Placement("small", "side", 1, 0.0)


def test_the_held_cluster_is_the_first_in_preference_order_that_could_take_it_empty():
    # "tiny" can never take 4; "home" can when empty; "lease" too, but it comes later.
    fleet = [cluster("tiny", 2, total=2), cluster("lease", 1, kind=LEASED), cluster("home", 0)]
    [d] = place([job("big", 4)], fleet, NOW)
    assert d.holds == "home"
    [d] = place([job("big", 4, clusters=("lease", "home"))], fleet, NOW)
    assert d.holds == "lease"


def test_only_one_job_holds_and_it_is_the_first_waiting_for_devices_alone():
    queue = [
        job("never", 16, priority=9),  # infeasible: it waits for nothing that will come
        job("later", 4, priority=8, not_before=NOW + 60, failures=2),  # backing off
        job("big", 4, priority=5),
        job("bigger", 4, priority=4),
        job("low", 1, priority=0),
    ]
    d = by_id(place(queue, [cluster("home", 2)], NOW))
    assert [j for j, w in d.items() if w.holds] == ["big"]
    assert "held for big" in d["bigger"].reason
    assert "held for big" in d["low"].reason


def test_a_job_waiting_for_its_spill_wait_holds_nothing():
    fleet = [cluster("home", 0, total=2), cluster("lease", 4, kind=LEASED)]
    queue = [job("spiller", 4, priority=1, spill_after_s=600, waiting_since=NOW), job("small", 2)]
    d = by_id(place(queue, fleet, NOW))
    assert isinstance(d["spiller"], Wait) and d["spiller"].holds is None
    assert d["small"] == Placement("small", "lease", 2, 0.0)


def test_equal_priority_and_higher_priority_jobs_are_not_held_back():
    queue = [job("boss", 1, priority=9), job("big", 4, priority=5), job("peer", 1, priority=5)]
    d = by_id(place(queue, [cluster("home", 3)], NOW))
    assert d["boss"] == Placement("boss", "home", 1, 0.0)
    assert d["big"].holds == "home"
    assert d["peer"] == Placement("peer", "home", 1, 0.0)


def test_an_empty_cluster_is_taken_by_the_big_job_itself():
    d = by_id(place([job("big", 4, priority=1), job("small", 1)], [cluster("home", 4)], NOW))
    assert d["big"] == Placement("big", "home", 4, 0.0)
    assert isinstance(d["small"], Wait) and d["small"].holds == "home"


# ---- property: no starvation -------------------------------------------------------------

MAX_RUN_TICKS = 5
ARRIVES_BY = 5
TICKS = ARRIVES_BY + MAX_RUN_TICKS + 2

# Per tick, the small jobs that arrive: (devices, ticks they run once placed).
_arrivals = st.lists(
    st.lists(st.tuples(st.integers(1, 8), st.integers(1, MAX_RUN_TICKS)), max_size=3),
    min_size=TICKS,
    max_size=TICKS,
)


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 8), st.integers(0, ARRIVES_BY), _arrivals)
def test_a_stream_of_small_low_priority_jobs_never_starves_a_big_one(devices, arrives, arrivals):
    """Ticks of `place` on one cluster: running jobs end after their ticks, small ones keep
    arriving; the big job, needing the whole cluster, starts once the ones already running end."""
    runs_for: dict[str, int] = {}
    queue: dict[str, JobRequest] = {}
    running: dict[str, tuple[int, int]] = {}  # job -> (devices, the tick it ends)
    started_at = None
    for tick in range(TICKS):
        running = {j: r for j, r in running.items() if r[1] > tick}
        for i, (size, ticks) in enumerate(arrivals[tick]):
            small = job(f"s{tick}.{i}", min(size, devices), priority=0, submitted_at=tick)
            queue[small.job_id], runs_for[small.job_id] = small, ticks
        if tick == arrives:
            queue["big"] = job("big", devices, priority=1, submitted_at=tick)
        free = devices - sum(n for n, _ in running.values())
        fleet = [cluster("home", free, total=devices)]
        for d in place(list(queue.values()), fleet, float(tick)):
            if not isinstance(d, Placement):
                continue
            del queue[d.job_id]
            if d.job_id == "big":
                started_at = tick
            else:
                assert started_at is None and (tick < arrives or "big" not in queue), (
                    "a small job took devices the waiting big job holds"
                )
                running[d.job_id] = (d.world_size, tick + runs_for[d.job_id])
        if started_at is not None:
            break
    assert started_at is not None, "the big job starved"
    # Everything running when it arrived has ended by then; nothing new started meanwhile.
    assert started_at <= arrives + MAX_RUN_TICKS
