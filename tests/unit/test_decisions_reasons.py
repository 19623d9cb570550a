"""Wait reasons are stable text: the same blocking fact gives the same line tick after tick, and
the numbers that move go to `detail` (the controller records a reason only when it changes)."""

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

NOW = 1_000_000.0
HOUR = 3600.0


def owned(free: int, total: int = 4, **kw) -> ClusterSnapshot:
    return ClusterSnapshot("home", OWNED, "h100", total, free, 0.0, **kw)


def lease(free: int = 4, left: float = HOUR, rate: float = 2.0, **kw) -> ClusterSnapshot:
    window = {"lease_start": NOW - HOUR, "lease_end": NOW + left, **kw}
    return ClusterSnapshot("partner", LEASED, "h100", 4, free, rate, **window)


def wait(job: JobRequest, fleet: list[ClusterSnapshot], now: float) -> Wait:
    [d] = place([job], fleet, now)
    assert isinstance(d, Wait), d
    return d


def test_free_devices_trickling_back_keep_one_reason_and_move_the_detail():
    j = JobRequest("big", (4,))
    waits = [wait(j, [owned(free)], NOW + free) for free in range(4)]
    assert {w.reason for w in waits} == {"home: fewer than 4 devices free (of 4)"}
    assert [w.detail["devices_free"] for w in waits] == [0, 1, 2, 3]


def test_a_lease_running_out_keeps_one_reason():
    j = JobRequest("j", (2,), min_lease_left_s=600)
    waits = [wait(j, [lease(left=left)], NOW) for left in (599.0, 400.0, 1.5)]
    assert {w.reason for w in waits} == {
        "partner: lease ends sooner than placement.min_lease_left_s=600"
    }
    assert [w.detail["lease_left_s"] for w in waits] == [599.0, 400.0, 1.5]


def test_the_spill_wait_keeps_one_reason_while_the_seconds_count_up():
    j = JobRequest("j", (2,), spill_after_s=60, waiting_since=NOW)
    fleet = [owned(0, total=2), lease()]
    waits = [wait(j, fleet, NOW + s) for s in (0.0, 1.0, 30.5, 59.5)]
    assert len({w.reason for w in waits}) == 1
    assert [w.detail["waited_s"] for w in waits] == [0.0, 1.0, 30.5, 59.5]
    [placed] = place([j], fleet, NOW + 60)
    assert isinstance(placed, Placement) and placed.cluster == "partner"


def test_a_budget_refusal_keeps_one_reason_while_the_projected_cost_shrinks():
    # Unknown remaining time on a lease is priced to the lease end, which comes closer.
    j = JobRequest("j", (2,), budget=1.0)
    waits = [wait(j, [lease(left=left)], NOW) for left in (HOUR, HOUR / 2, HOUR / 3)]
    assert len({w.reason for w in waits}) == 1
    assert [round(w.detail["projected_cost"], 6) for w in waits] == [4.0, 2.0, 1.333333]
    assert {w.detail["budget_left"] for w in waits} == {1.0}


def test_lease_windows_keep_one_reason_each_side():
    early = [wait(JobRequest("j", (2,)), [lease(lease_start=NOW + s)], NOW) for s in (300, 2)]
    assert {w.reason for w in early} == {"partner: lease has not started"}
    assert [w.detail for w in early] == [{"lease_starts_in_s": 300.0}, {"lease_starts_in_s": 2.0}]
    late = [wait(JobRequest("j", (2,)), [lease()], NOW + HOUR + s) for s in (0, 90)]
    assert {w.reason for w in late} == {"partner: lease has ended"}


def test_a_job_backing_off_waits_with_its_count_and_the_time_in_detail():
    j = JobRequest("j", (2,), not_before=NOW + 40, failures=3)
    w = wait(j, [owned(4)], NOW)
    assert w == Wait(
        "j",
        "backing off after 3 failed attempts to start",
        {"retry_in_s": 40.0, "not_before": NOW + 40},
    )
    assert wait(j, [owned(4)], NOW + 39).reason == w.reason
    one = JobRequest("j", (2,), not_before=NOW + 5, failures=1)
    assert wait(one, [owned(4)], NOW).reason == "backing off after 1 failed attempt to start"
    # The back-off is over at not_before.
    assert place([j], [owned(4)], NOW + 40) == [Placement("j", "home", 2, 0.0)]


def test_a_permanent_reason_beats_the_back_off():
    j = JobRequest("j", (8,), not_before=NOW + 40, failures=2)
    w = wait(j, [owned(4)], NOW)
    assert w.reason == "wants 8 devices; the largest accepted cluster (home) has 4"


def test_the_reason_for_a_spent_budget_keeps_the_amount_in_detail():
    w = wait(JobRequest("j", (2,), budget=5.0, cost_so_far=6.5), [owned(4)], NOW)
    assert w == Wait("j", "cost so far already exceeds placement.budget=5.00", {"cost_so_far": 6.5})


# ---- property: only live numbers move, so the text does not -------------------------------

PROPERTY = settings(max_examples=150, deadline=None)

# Values chosen so that no threshold lies between NOW and NOW + 0.5 (the largest step below):
# lease starts, lease ends, the spill wait and min_lease_left_s all sit well clear of it.
_lease_start = st.sampled_from([-7200.0, -600.0, 300.0])
_lease_left = st.sampled_from([-60.0, 0.0, 2.0, 100.0, 3600.0])


@st.composite
def clusters(draw: st.DrawFn, name: str) -> ClusterSnapshot:
    kind = draw(st.sampled_from([OWNED, LEASED]))
    total = draw(st.integers(1, 8))
    start = end = None
    if kind == LEASED:
        start = NOW + draw(_lease_start)
        end = max(NOW + draw(_lease_left), start + 1)
    return ClusterSnapshot(
        name=name,
        kind=kind,
        device_type=draw(st.sampled_from(["a100", "h100"])),
        devices_total=total,
        devices_free=total if draw(st.booleans()) else draw(st.integers(0, total)),
        cost_per_device_hour=draw(st.sampled_from([0.0, 2.0])),
        lease_start=start,
        lease_end=end,
        reachable=draw(st.sampled_from([True, True, True, False])),
    )


fleets = st.integers(1, 4).flatmap(lambda n: st.tuples(*(clusters(f"c{i}") for i in range(n))))


@st.composite
def lone_jobs(draw: st.DrawFn) -> JobRequest:
    low = draw(st.integers(1, 5))
    return JobRequest(
        job_id="j",
        world_sizes=tuple(range(low, low + draw(st.integers(1, 3)))),
        device_types=draw(st.sampled_from([(), ("h100",), ("a100", "h100")])),
        waiting_since=NOW - draw(st.sampled_from([0.0, 10.0, 100.0])),
        spill_after_s=draw(st.sampled_from([0.0, 30.0, 60.0, 600.0])),
        min_lease_left_s=draw(st.sampled_from([0.0, 50.0, 1000.0])),
        budget=draw(st.sampled_from([None, 0.0, 1e9])),
        not_before=draw(st.sampled_from([0.0, 0.0, 0.0, NOW + 100])),
        failures=draw(st.integers(0, 3)),
    )


@PROPERTY
@given(fleets, lone_jobs(), st.sampled_from([0.1, 0.5]), st.data())
def test_time_passing_and_devices_that_still_do_not_fit_leave_the_reason_as_it_was(
    fleet, job, step, data
):
    # Later: a little time has passed, and each cluster too small for the job now has some
    # other count free that is still too small. The blocking facts are the same.
    need = job.world_sizes[0]
    later = []
    for c in fleet:
        free = c.devices_free
        if free < need:
            free = data.draw(st.integers(0, min(need - 1, c.devices_total)))
        later.append(ClusterSnapshot(**{**c.__dict__, "devices_free": free}))
    [before] = place([job], fleet, NOW)
    [after] = place([job], later, NOW + step)
    assert type(before) is type(after)
    if isinstance(before, Wait):
        assert after.reason == before.reason, "the reason moved with a live number"
        assert after.holds == before.holds
        assert set(after.detail) == set(before.detail)
