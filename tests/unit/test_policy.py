"""The placement policy on small, hand-written fleets: one rule per test."""

from __future__ import annotations

import pytest

from orchestrator.scheduling import (
    ClusterSnapshot,
    JobRequest,
    Placement,
    Wait,
    hold_past_unknown,
    infeasible,
    place,
    queue_order,
)

NOW = 1_000_000.0
HOUR = 3600.0


def home(**kw) -> ClusterSnapshot:
    return ClusterSnapshot(
        **{
            "name": "home",
            "kind": "owned",
            "device_type": "h100",
            "devices_total": 2,
            "devices_free": 2,
            "cost_per_device_hour": 0.0,
            **kw,
        }
    )


def partner(**kw) -> ClusterSnapshot:
    # A lease that started an hour ago and has an hour left.
    return ClusterSnapshot(
        **{
            "name": "partner",
            "kind": "leased",
            "device_type": "h100",
            "devices_total": 4,
            "devices_free": 4,
            "cost_per_device_hour": 2.0,
            "lease_start": NOW - HOUR,
            "lease_end": NOW + HOUR,
            **kw,
        }
    )


def job(job_id: str = "j", world_sizes: tuple[int, ...] = (2,), **kw) -> JobRequest:
    return JobRequest(job_id=job_id, world_sizes=world_sizes, **kw)


def decide(j: JobRequest, fleet: list[ClusterSnapshot], now: float = NOW) -> Placement | Wait:
    [decision] = place([j], fleet, now)
    return decision


# ---- ordered spillover ---------------------------------------------------------------------


def test_job_goes_to_the_empty_owned_cluster():
    assert decide(job(), [home(), partner()]) == Placement("j", "home", 2, 0.0)


def test_second_job_spills_to_the_lease_when_home_is_full():
    jobs = [job("a", submitted_at=1), job("b", submitted_at=2)]
    a, b = place(jobs, [home(), partner()], NOW)
    assert a == Placement("a", "home", 2, 0.0)
    # Unknown remaining time: priced at the most it can cost there, until the lease ends.
    assert b == Placement("b", "partner", 2, 2 * 2.0 * 1.0)


def test_lease_listed_first_in_the_fleet_still_comes_after_owned():
    assert decide(job(), [partner(), home()]).cluster == "home"


def test_spill_after_s_holds_the_job_until_it_has_waited_long_enough():
    fleet = [home(devices_free=0), partner()]
    early = decide(job(waiting_since=NOW - 30, spill_after_s=60), fleet)
    assert isinstance(early, Wait)
    assert early.reason == (
        "waiting placement.spill_after_s=60 for owned capacity before using partner; "
        "home: fewer than 2 devices free (of 2)"
    )
    assert early.detail == {"waited_s": 30.0, "devices_free": 0}
    late = decide(job(waiting_since=NOW - 60, spill_after_s=60), fleet)
    assert isinstance(late, Placement) and late.cluster == "partner"


def test_spill_wait_applies_to_a_lease_with_no_owned_cluster_before_it():
    d = decide(job(clusters=("partner",), waiting_since=NOW - 0.5, spill_after_s=60), [partner()])
    assert d == Wait(
        "j",
        "waiting placement.spill_after_s=60 for owned capacity before using partner",
        {"waited_s": 0.5},
    )


def test_spill_wait_does_not_hold_a_job_that_owned_capacity_can_take():
    assert decide(job(waiting_since=NOW, spill_after_s=600), [home(), partner()]).cluster == "home"


def test_min_lease_left_s_refuses_a_lease_that_ends_too_soon():
    fleet = [partner(lease_end=NOW + 120)]
    refused = decide(job(min_lease_left_s=600), fleet)
    assert refused == Wait(
        "j",
        "partner: lease ends sooner than placement.min_lease_left_s=600",
        {"lease_left_s": 120.0},
    )
    assert decide(job(min_lease_left_s=120), fleet).cluster == "partner"


def test_budget_refuses_an_expensive_lease_and_a_cheaper_one_is_chosen():
    pricey = partner(name="pricey", cost_per_device_hour=10.0)
    cheap = partner(name="cheap", cost_per_device_hour=1.0)
    j = job(budget=5.0, cost_so_far=1.0, expected_remaining_s=1800)
    # pricey: 2 devices * 10/h * 0.5 h = 10 > 4 left; cheap: 2 * 1 * 0.5 = 1.
    assert decide(j, [home(devices_free=0), pricey, cheap]) == Placement("j", "cheap", 2, 1.0)
    alone = decide(j, [pricey])
    assert alone == Wait(
        "j",
        "pricey: projected cost exceeds what is left of placement.budget=5.00",
        {"projected_cost": 10.0, "budget_left": 4.0},
    )


def test_cost_is_capped_at_the_lease_end_and_uses_expected_remaining_when_shorter():
    long_job = job(expected_remaining_s=10 * HOUR)
    assert decide(long_job, [partner()]).projected_cost == 2 * 2.0 * 1.0
    short_job = job(expected_remaining_s=HOUR / 4)
    assert decide(short_job, [partner()]).projected_cost == 2 * 2.0 * 0.25


def test_owned_clusters_are_budget_checked_too():
    paid = home(cost_per_device_hour=3.0)
    j = job(budget=5.0, expected_remaining_s=HOUR)
    assert decide(j, [paid]) == Wait(
        "j",
        "home: projected cost exceeds what is left of placement.budget=5.00",
        {"projected_cost": 6.0, "budget_left": 5.0},
    )
    # With no known remaining time an owned cluster's cost counts as zero.
    assert decide(job(budget=5.0), [paid]) == Placement("j", "home", 2, 0.0)


# ---- explicit cluster preference -----------------------------------------------------------


def test_explicit_cluster_order_prefers_the_lease_over_free_owned_capacity():
    d = decide(job(clusters=("partner", "home")), [home(), partner()])
    assert d.cluster == "partner"


def test_explicit_order_still_applies_every_lease_rule():
    fleet = [home(), partner(lease_end=NOW + 60)]
    d = decide(job(clusters=("partner", "home"), min_lease_left_s=600), fleet)
    assert d.cluster == "home"
    d = decide(job(clusters=("partner", "home"), waiting_since=NOW, spill_after_s=60), fleet)
    assert d.cluster == "home"


def test_explicit_order_ignores_unknown_names_and_excludes_unlisted_clusters():
    fleet = [home(devices_free=0), partner()]
    d = decide(job(clusters=("gone", "home")), fleet)
    assert d == Wait("j", "home: fewer than 2 devices free (of 2)", {"devices_free": 0}, "home")


# ---- gang and world size -------------------------------------------------------------------


def test_world_size_is_the_largest_allowed_size_that_fits():
    d = decide(job(world_sizes=(1, 2, 4)), [home(devices_total=4, devices_free=3)])
    assert d == Placement("j", "home", 2, 0.0)


def test_gang_is_never_split_across_clusters():
    fleet = [home(devices_free=2), partner(devices_free=2)]
    # Home can never take 4; the partner could when empty, so the job holds the partner.
    assert decide(job(world_sizes=(4,)), fleet) == Wait(
        "j", "home: fewer than 4 devices free (of 2)", {"devices_free": 2}, holds="partner"
    )


def test_earlier_jobs_consume_capacity_and_later_small_jobs_of_equal_priority_backfill():
    fleet = [home(devices_total=4, devices_free=3)]
    jobs = [
        job("big", (4,), submitted_at=1),
        job("mid", (2,), submitted_at=2),
        job("small", (1, 2), submitted_at=3),
    ]
    big, mid, small = place(jobs, fleet, NOW)
    assert big == Wait("big", "home: fewer than 4 devices free (of 4)", {"devices_free": 3}, "home")
    assert mid == Placement("mid", "home", 2, 0.0)
    assert small == Placement("small", "home", 1, 0.0)


# ---- queue order ---------------------------------------------------------------------------


def test_queue_order_is_priority_then_fifo_then_job_id():
    jobs = [
        job("c", priority=0, submitted_at=1),
        job("b", priority=0, submitted_at=1),
        job("late", priority=5, submitted_at=9),
        job("first", priority=0, submitted_at=0),
    ]
    assert [j.job_id for j in queue_order(jobs)] == ["late", "first", "b", "c"]


def test_higher_priority_gets_the_capacity_and_decisions_come_in_queue_order():
    jobs = [job("old", submitted_at=1), job("urgent", priority=1, submitted_at=5)]
    urgent, old = place(jobs, [home()], NOW)
    assert urgent == Placement("urgent", "home", 2, 0.0)
    assert isinstance(old, Wait) and old.job_id == "old"


def test_equal_priority_is_first_come_first_served():
    jobs = [job("second", submitted_at=2), job("first", submitted_at=1)]
    first, second = place(jobs, [home()], NOW)
    assert first.job_id == "first" and isinstance(first, Placement)
    assert isinstance(second, Wait)


# ---- which clusters are candidates ---------------------------------------------------------


def test_unreachable_cluster_is_skipped():
    assert decide(job(), [home(reachable=False), partner()]).cluster == "partner"
    assert decide(job(), [home(reachable=False)]) == Wait("j", "home: unreachable", {})


def test_a_job_is_not_placed_past_a_cluster_it_prefers_while_that_cluster_is_unknown():
    """Unknown: its last probe failed, short of lost. The job waits for it rather than going
    to its second choice for good; a job that prefers the placed cluster is not held."""
    fleet = [home(reachable=False), partner()]
    jobs = [job("a"), job("b", clusters=("partner", "home"))]
    decided = place(jobs, fleet, NOW)
    assert [d.cluster for d in decided] == ["partner", "partner"]
    held = hold_past_unknown(decided, jobs, fleet, {"home"}, NOW)
    assert isinstance(held[0], Wait) and held[0].reason.startswith(
        "waiting for an answer from home"
    )
    assert held[1] == decided[1]
    # Lost (no longer unknown), or one that could never take it: passed over as before.
    assert hold_past_unknown(decided, jobs, fleet, set(), NOW) == decided
    too_small = [home(reachable=False, devices_total=1, devices_free=1), partner()]
    assert hold_past_unknown(place(jobs, too_small, NOW), jobs, too_small, {"home"}, NOW) == (
        place(jobs, too_small, NOW)
    )
    # A lease outside its window is not waited for either.
    ended = [home(), partner(reachable=False, lease_end=NOW - 1)]
    late = [job("c", clusters=("partner", "home"))]
    assert hold_past_unknown(place(late, ended, NOW), late, ended, {"partner"}, NOW) == place(
        late, ended, NOW
    )


def test_lease_that_has_not_started_or_has_ended_is_skipped():
    not_yet = partner(lease_start=NOW + 300, lease_end=NOW + 2 * HOUR)
    assert decide(job(), [not_yet]) == Wait(
        "j", "partner: lease has not started", {"lease_starts_in_s": 300.0}
    )
    over = partner(lease_start=NOW - 2 * HOUR, lease_end=NOW - 20)
    assert decide(job(), [over]) == Wait(
        "j", "partner: lease has ended", {"lease_ended_s_ago": 20.0}
    )
    # The window is [lease_start, lease_end): a lease ending right now is over.
    assert decide(job(), [partner(lease_end=NOW)]) == Wait(
        "j", "partner: lease has ended", {"lease_ended_s_ago": 0.0}
    )
    assert decide(job(), [partner(lease_start=NOW)]).cluster == "partner"


def test_device_type_preference_orders_clusters_of_the_same_kind():
    a100 = home(name="a100-box", device_type="a100")
    h100 = home(name="h100-box", device_type="h100")
    assert decide(job(device_types=("h100", "a100")), [a100, h100]).cluster == "h100-box"
    assert decide(job(device_types=("a100",)), [h100, a100]).cluster == "a100-box"
    assert decide(job(), [a100, h100]).cluster == "a100-box"  # any type: fleet order


def test_owned_first_outranks_device_type_preference():
    owned_a100 = home(device_type="a100")
    assert decide(job(device_types=("h100", "a100")), [owned_a100, partner()]).cluster == "home"


def test_no_cluster_of_an_accepted_device_type():
    d = decide(job(device_types=("b200",)), [home(), partner()])
    assert d == Wait("j", "no accepted cluster has device type b200 (they have h100)")


# ---- infeasible ----------------------------------------------------------------------------


def test_infeasible_explains_what_can_never_fit():
    fleet = [home(devices_free=0), partner(devices_free=0, reachable=False)]
    assert infeasible(job(world_sizes=(8, 16)), fleet) == (
        "wants at least 8 devices; the largest accepted cluster (partner) has 4"
    )
    assert infeasible(job(world_sizes=(4,), clusters=("home",)), fleet) == (
        "wants 4 devices; the largest accepted cluster (home) has 2"
    )
    assert infeasible(job(device_types=("h200", "b200")), fleet) == (
        "no accepted cluster has device type h200 or b200 (they have h100)"
    )
    assert infeasible(job(clusters=("mars",)), fleet) == (
        "placement.clusters names no cluster of the fleet (fleet: home, partner)"
    )
    assert infeasible(job(budget=5.0, cost_so_far=6.0), fleet) == (
        "cost so far already exceeds placement.budget=5.00"
    )
    assert infeasible(job(), []) == "the fleet has no clusters"


def test_infeasible_ignores_free_devices_reachability_and_lease_timing():
    fleet = [home(devices_free=0, reachable=False), partner(lease_end=NOW - 1)]
    assert infeasible(job(world_sizes=(4,)), fleet) is None


def test_place_gives_the_permanent_reason_for_an_infeasible_job():
    d = decide(job(world_sizes=(8,)), [home(), partner()])
    assert d == Wait("j", "wants 8 devices; the largest accepted cluster (partner) has 4")


# ---- inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [(), (0, 2), (4, 2), (2, 2)])
def test_world_sizes_must_be_positive_and_strictly_ascending(sizes):
    with pytest.raises(ValueError, match="world_sizes"):
        job(world_sizes=sizes)


def test_lists_are_accepted_and_stored_as_tuples():
    j = JobRequest("j", [1, 2], device_types=["h100"], clusters=["home"])
    assert j.world_sizes == (1, 2) and j.clusters == ("home",)
    hash(j)


def test_inconsistent_snapshots_are_rejected():
    with pytest.raises(ValueError, match="devices_free"):
        home(devices_free=3)
    with pytest.raises(ValueError, match="lease_start and lease_end"):
        partner(lease_end=None)
    with pytest.raises(ValueError, match="kind"):
        home(kind="rented")


def test_duplicate_job_ids_or_cluster_names_are_rejected():
    with pytest.raises(ValueError, match="duplicate job_id: a"):
        place([job("a"), job("a", priority=1)], [home()], NOW)
    with pytest.raises(ValueError, match="duplicate cluster name: home"):
        place([job()], [home(), home()], NOW)


def test_input_lists_are_left_as_they_were():
    fleet, jobs = [partner(), home()], [job("a"), job("b", priority=1)]
    fleet_before, jobs_before = list(fleet), list(jobs)
    place(jobs, fleet, NOW)
    assert fleet == fleet_before and jobs == jobs_before
