"""Invariants of the placement policy over random fleets and queues.

Each property re-derives what it checks from the inputs (free devices, lease windows, cost
formula) rather than trusting the policy's own helpers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from itertools import permutations

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.scheduling import (
    LEASED,
    OWNED,
    ClusterSnapshot,
    JobRequest,
    Placement,
    Wait,
    infeasible,
    place,
    queue_order,
)

NOW = 1_000_000.0
NAMES = [f"c{i}" for i in range(6)]
TYPES = ["a100", "h100", "l4"]
DEVICE_PREFERENCES = [()] + list(permutations(TYPES, 1)) + list(permutations(TYPES, 2))

PROPERTY = settings(max_examples=200, deadline=None)

# Values are drawn from short lists that sit on and around every threshold the policy
# compares against (spill wait, lease time left, budget), so the edges are hit often; and
# one sampled_from per field draws several times faster than floats or one_of, which keeps
# the file well inside its time budget.
_size_masks = st.integers(1, 2**8 - 1)  # bit k set: world size k + 1 is allowed
_lease_started = st.sampled_from([-7200.0, -600.0, -1.0, 0.0, 1.0, 300.0])  # relative to NOW
_lease_left = st.sampled_from([-60.0, 0.0, 1.0, 59.0, 60.0, 600.0, 3599.0, 3600.0, 7200.0])
_waited = st.sampled_from([0.0, 29.5, 30.0, 60.0, 299.0, 300.0, 900.0])
_budgets = st.sampled_from([None, None, None, 0.0, 1.0, 5.0, 20.0, 100.0, 1000.0])
_remaining = st.sampled_from([None, 0.0, 60.0, 1800.0, 3600.0, 7200.0, 30_000.0])
# Mostly not backing off; otherwise on and around `now` (a back-off ending now is over).
_not_before = st.sampled_from([0.0, 0.0, 0.0, 0.0, NOW - 1, NOW, NOW + 0.5, NOW + 60])


@st.composite
def clusters(draw: st.DrawFn, name: str) -> ClusterSnapshot:
    kind = draw(st.sampled_from([OWNED, LEASED]))
    total = draw(st.integers(1, 16))
    lease_start = lease_end = None
    if kind == LEASED:
        lease_start = NOW + draw(_lease_started)
        lease_end = max(NOW + draw(_lease_left), lease_start + 1)
    return ClusterSnapshot(
        name=name,
        kind=kind,
        device_type=draw(st.sampled_from(TYPES)),
        devices_total=total,
        # Often empty, so that owned-first has clusters that fit.
        devices_free=total if draw(st.booleans()) else draw(st.integers(0, total)),
        cost_per_device_hour=draw(st.sampled_from([0.0, 0.5, 2.0, 10.0])),
        lease_start=lease_start,
        lease_end=lease_end,
        reachable=draw(st.sampled_from([True, True, True, False])),
    )


fleets = st.integers(1, 6).flatmap(lambda n: st.tuples(*(clusters(NAMES[i]) for i in range(n))))


@st.composite
def jobs(draw: st.DrawFn, job_id: str) -> JobRequest:
    sizes = draw(_size_masks)
    explicit = st.lists(st.sampled_from([*NAMES, "ghost"]), min_size=1, max_size=4)
    return JobRequest(
        job_id=job_id,
        world_sizes=tuple(size for size in range(1, 9) if sizes >> (size - 1) & 1),
        device_types=draw(st.sampled_from(DEVICE_PREFERENCES)) if draw(st.booleans()) else (),
        clusters=tuple(draw(explicit)) if draw(st.integers(0, 2)) == 0 else (),
        priority=draw(st.integers(0, 2)),
        submitted_at=draw(st.integers(0, 5)),  # few values, so ties go to job_id
        waiting_since=NOW - draw(_waited),
        budget=draw(_budgets),
        cost_so_far=draw(st.sampled_from([0.0, 0.0, 0.0, 0.5, 4.0, 50.0])),
        expected_remaining_s=draw(_remaining),
        spill_after_s=draw(st.sampled_from([0.0, 30.0, 60.0, 300.0])),
        min_lease_left_s=draw(st.sampled_from([0.0, 60.0, 600.0, 3600.0])),
        not_before=draw(_not_before),
        failures=draw(st.integers(0, 4)),
    )


queues = st.integers(1, 15).flatmap(lambda n: st.tuples(*(jobs(f"j{i:02d}") for i in range(n))))


def replay(
    queue: tuple[JobRequest, ...], fleet: tuple[ClusterSnapshot, ...]
) -> Iterator[tuple[JobRequest, Placement | Wait, dict[str, int]]]:
    """Each job with its decision and the free devices left for it by the jobs before it: what
    they took, and a cluster the head of the queue holds counts as full for lower priorities
    (which job holds, and where, is checked on its own below)."""
    by_id = {j.job_id: j for j in queue}
    free = {c.name: c.devices_free for c in fleet}
    held: tuple[str, int] | None = None  # (cluster, the holder's priority)
    for decision in place(queue, fleet, NOW):
        job = by_id[decision.job_id]
        left = dict(free)
        if held is not None and job.priority < held[1]:
            left[held[0]] = 0
        yield job, decision, left
        if isinstance(decision, Placement):
            free[decision.cluster] -= decision.world_size
        elif decision.holds is not None:
            held = (decision.holds, job.priority)


def accepts(job: JobRequest, cluster: ClusterSnapshot) -> bool:
    return (not job.clusters or cluster.name in job.clusters) and (
        not job.device_types or cluster.device_type in job.device_types
    )


def expected_cost(job: JobRequest, cluster: ClusterSnapshot, world_size: int) -> float:
    if cluster.kind == LEASED:
        seconds = cluster.lease_end - NOW
        if job.expected_remaining_s is not None:
            seconds = min(seconds, job.expected_remaining_s)
    else:
        seconds = job.expected_remaining_s or 0.0
    return world_size * cluster.cost_per_device_hour * (seconds / 3600)


def within_budget(job: JobRequest, cost: float) -> bool:
    return job.budget is None or job.cost_so_far + cost <= job.budget


def could_take(job: JobRequest, c: ClusterSnapshot, free: int) -> bool:
    """Every placement rule, restated: could `c` take `job` now with `free` devices left?"""
    fitting = [w for w in job.world_sizes if w <= free]
    if not (fitting and c.reachable and accepts(job, c) and NOW >= job.not_before):
        return False
    if c.kind == LEASED and not (
        c.lease_start <= NOW < c.lease_end
        and c.lease_end - NOW >= job.min_lease_left_s
        and NOW - job.waiting_since >= job.spill_after_s
    ):
        return False
    return within_budget(job, expected_cost(job, c, max(fitting)))


def owned_fits(job: JobRequest, fleet: Sequence[ClusterSnapshot], free: dict[str, int]) -> bool:
    return any(c.kind == OWNED and could_take(job, c, free[c.name]) for c in fleet)


# Properties that need the same random queue and fleet share one test: generating those is
# most of the cost, and a failing assertion still names the property it checks.


@PROPERTY
@given(queues, fleets)
def test_each_job_gets_one_decision_and_a_placement_is_a_whole_gang_that_fits(queue, fleet):
    decisions = place(queue, fleet, NOW)
    assert [d.job_id for d in decisions] == [j.job_id for j in queue_order(queue)]
    by_name = {c.name: c for c in fleet}
    used = Counter()
    for job, d, free in replay(queue, fleet):
        assert isinstance(d, (Placement, Wait))
        reason = infeasible(job, fleet)
        if reason is not None:
            assert isinstance(d, Wait), "a job reported infeasible was placed"
            assert d.reason == reason
        if isinstance(d, Wait):
            assert d.reason and "\n" not in d.reason
            assert all(isinstance(v, (int, float, str)) for v in d.detail.values())
            continue
        assert NOW >= job.not_before, "placed while backing off"
        cluster = by_name[d.cluster]  # exactly one cluster: a Placement cannot name two
        assert cluster.reachable, "placed on an unreachable cluster"
        assert accepts(job, cluster), "placed on a cluster the job does not accept"
        assert d.world_size == max(w for w in job.world_sizes if w <= free[d.cluster])
        used[d.cluster] += d.world_size
    for c in fleet:
        assert used[c.name] <= c.devices_free, f"{c.name} oversubscribed"


@PROPERTY
@given(queues, fleets)
def test_leases_budgets_owned_first_and_no_needless_wait(queue, fleet):
    by_name = {c.name: c for c in fleet}
    for job, d, free in replay(queue, fleet):
        if isinstance(d, Placement):
            cluster = by_name[d.cluster]
            cost = expected_cost(job, cluster, d.world_size)
            assert abs(d.projected_cost - cost) <= 1e-9 * max(1.0, cost)
            assert within_budget(job, d.projected_cost), "over budget"
            if cluster.kind == LEASED:
                assert cluster.lease_start <= NOW < cluster.lease_end, "outside the lease"
                assert cluster.lease_end - NOW >= job.min_lease_left_s, "lease too short"
                assert NOW - job.waiting_since >= job.spill_after_s, "spilled too early"
        # No needless wait: if any cluster could take the job, it is placed.
        if any(could_take(job, c, free[c.name]) for c in fleet):
            assert isinstance(d, Placement), "waits although a cluster could take it"
        # Owned first, against the capacity the jobs before this one left; only for jobs
        # without an explicit list, whose order may put a lease first.
        if not job.clusters and owned_fits(job, fleet, free):
            assert isinstance(d, Placement), "waits although owned capacity fits"
            assert by_name[d.cluster].kind == OWNED, "spilled although owned capacity fits"


@PROPERTY
@given(fleets, jobs("only"))
def test_the_first_job_is_never_spilled_when_an_empty_owned_cluster_fits_it(fleet, job):
    # The plain statement of owned-first, for a job no earlier decision can affect.
    empty = [c for c in fleet if c.devices_free == c.devices_total]
    [d] = place([job], fleet, NOW)
    if not job.clusters and owned_fits(job, empty, {c.name: c.devices_total for c in empty}):
        assert isinstance(d, Placement)
        assert next(c for c in fleet if c.name == d.cluster).kind == OWNED


@PROPERTY
@given(queues, fleets, st.data())
def test_place_is_deterministic_and_ignores_the_order_of_the_input_list(queue, fleet, data):
    shuffled = data.draw(st.permutations(queue))
    first = place(queue, fleet, NOW)
    assert place(queue, fleet, NOW) == first
    assert place(list(shuffled), fleet, NOW) == first


@PROPERTY
@given(queues, fleets)
def test_the_first_job_waiting_for_devices_alone_holds_its_cluster_against_lower_priorities(
    queue, fleet
):
    by_name = {c.name: c for c in fleet}
    free = {c.name: c.devices_free for c in fleet}
    holder: tuple[JobRequest, str] | None = None
    for d in place(queue, fleet, NOW):
        job = next(j for j in queue if j.job_id == d.job_id)
        if isinstance(d, Placement):
            if holder is not None and job.priority < holder[0].priority:
                assert d.cluster != holder[1], "a lower priority took the held cluster"
            free[d.cluster] -= d.world_size
            continue
        # Re-derived: would some cluster take it if that cluster were empty?
        empty_fits = [c for c in fleet if could_take(job, c, c.devices_total)]
        if holder is not None or not empty_fits:
            assert d.holds is None, "a second job holds, or one that waits for more than devices"
            continue
        assert d.holds in {c.name for c in empty_fits}, "holds a cluster it could not use"
        held = by_name[d.holds]
        assert not could_take(job, held, free[held.name]), "holds a cluster that takes it now"
        if not job.clusters and any(c.kind == OWNED for c in empty_fits):
            assert held.kind == OWNED, "holds a lease before an owned cluster it prefers"
        holder = (job, d.holds)
