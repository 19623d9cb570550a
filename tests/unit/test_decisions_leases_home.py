"""The lease watch and return home, as pure decisions over frozen inputs."""

from __future__ import annotations

from orchestrator.scheduling import (
    LEASED,
    OWNED,
    AwayRun,
    ClusterSnapshot,
    HomeMove,
    JobRequest,
    OnLease,
    lease_drains,
    return_home_moves,
)

NOW = 10_000.0

# ---- lease watch ---------------------------------------------------------------------------


def test_a_job_drains_once_the_lease_left_is_within_its_margin_plus_its_last_save():
    a = OnLease("j", "partner", lease_drain_margin_s=60.0, last_save_s=20.0)
    ends = {"partner": NOW + 81.0}
    assert lease_drains([a], ends, NOW) == []
    [(job_id, cause)] = lease_drains([a], ends, NOW + 1.0)
    assert job_id == "j"
    assert cause == (
        "lease on partner ends in 80s; draining to move on (its save takes 20.0s, margin 60s)"
    )


def test_each_attempt_is_judged_by_its_own_margin_save_and_lease():
    attempts = [
        OnLease("slow-save", "a", 60.0, last_save_s=120.0),
        OnLease("quick", "a", 60.0, last_save_s=1.0),
        OnLease("other-lease", "b", 60.0),
        OnLease("owned", "home", 60.0),  # no lease end: never drained by the lease watch
    ]
    ends = {"a": NOW + 100.0, "b": NOW + 30.0}
    assert [j for j, _ in lease_drains(attempts, ends, NOW)] == ["slow-save", "other-lease"]


def test_a_lease_already_over_still_drains_and_says_zero_seconds():
    [(_, cause)] = lease_drains([OnLease("j", "a", 60.0)], {"a": NOW - 5}, NOW)
    assert cause.startswith("lease on a ends in 0s")


# ---- return home ---------------------------------------------------------------------------


def owned(name: str, free: int, total: int = 4, **kw) -> ClusterSnapshot:
    return ClusterSnapshot(name, OWNED, "cpu", total, free, 0.0, **kw)


def away(job_id: str, size: int = 2, lease: str = "partner", **kw) -> AwayRun:
    return AwayRun(JobRequest(job_id, (size,), **kw), lease)


def test_a_job_on_a_lease_moves_to_an_owned_cluster_with_room():
    moves = return_home_moves([away("j")], [owned("home", 4)], [], NOW)
    assert moves == [HomeMove("j", "partner", "home", 2)]
    assert moves[0].cause == "room on home (owned): leaving the lease on partner"


def test_no_move_without_room():
    assert return_home_moves([away("j", size=4)], [owned("home", 3)], [], NOW) == []


def test_only_a_waiting_job_that_accepts_that_owned_cluster_blocks_it():
    homes = [owned("home", 4), owned("lab", 4)]
    wants_home = JobRequest("w", (2,), clusters=("home",))
    moves = return_home_moves([away("j")], homes, [wants_home], NOW)
    assert moves == [HomeMove("j", "partner", "lab", 2)]
    # A waiting job that accepts neither owned cluster (it wants the lease) blocks nothing.
    lease_only = JobRequest("w", (2,), clusters=("partner",))
    assert return_home_moves([away("j")], homes, [lease_only], NOW)[0].to == "home"
    # One that accepts the whole fleet blocks every owned cluster.
    anywhere = JobRequest("w", (2,))
    assert return_home_moves([away("j")], homes, [anywhere], NOW) == []


def test_a_waiting_job_too_big_for_an_owned_cluster_does_not_block_it():
    huge = JobRequest("w", (8,))  # waits for some other, bigger cluster
    assert return_home_moves([away("j")], [owned("home", 4)], [huge], NOW)[0].to == "home"


def test_a_move_already_in_flight_blocks_that_cluster_and_one_move_per_cluster_per_tick():
    homes = [owned("home", 4), owned("lab", 4)]
    runs = [away("a", priority=1), away("b"), away("c")]
    moves = return_home_moves(runs, homes, [], NOW)
    assert moves == [HomeMove("a", "partner", "home", 2), HomeMove("b", "partner", "lab", 2)]
    assert return_home_moves(runs, homes, [], NOW, moving_to={"home"}) == [
        HomeMove("a", "partner", "lab", 2)
    ]


def test_the_jobs_accepted_clusters_and_device_types_are_respected():
    homes = [owned("home", 4), ClusterSnapshot("gpu-box", OWNED, "h100", 4, 4, 0.0)]
    assert return_home_moves([away("j", clusters=("partner",))], homes, [], NOW) == []
    typed = away("j", device_types=("h100",))
    assert return_home_moves([typed], homes, [], NOW) == [HomeMove("j", "partner", "gpu-box", 2)]


def test_leased_clusters_are_never_a_home_and_a_past_back_off_does_not_hold_a_move():
    other_lease = ClusterSnapshot(
        "lease2", LEASED, "cpu", 4, 4, 0.0, lease_start=0.0, lease_end=1e9
    )
    assert return_home_moves([away("j")], [other_lease], [], NOW) == []
    backed_off = away("j", not_before=NOW + 100, failures=3)
    assert return_home_moves([backed_off], [owned("home", 4)], [], NOW)[0].to == "home"


def test_the_budget_still_applies_on_a_paid_owned_cluster():
    paid = ClusterSnapshot("home", OWNED, "cpu", 4, 4, 10.0)
    poor = away("j", budget=1.0, expected_remaining_s=3600.0)
    assert return_home_moves([poor], [paid], [], NOW) == []
