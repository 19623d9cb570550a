"""The recovery rules: how an attempt's end is read, and where each strategy sends the job."""

from __future__ import annotations

import pytest

from orchestrator import exit_codes
from orchestrator.backends.ray_jobs import exit_code_of
from orchestrator.controller.recovery import (
    Failover,
    Outcome,
    Restart,
    classify,
    cluster_at_fault,
    recover,
)

USER = [1, 2]


@pytest.mark.parametrize(
    ("status", "code", "outcome"),
    [
        ("SUCCEEDED", 0, Outcome.SUCCEEDED),
        ("FAILED", exit_codes.DRAINED, Outcome.DRAINED),
        ("FAILED", exit_codes.NO_CAPACITY, Outcome.NO_CAPACITY),
        ("FAILED", 1, Outcome.USER_ERROR),  # the recipe raised
        ("FAILED", 2, Outcome.USER_ERROR),  # a bad config
        ("FAILED", exit_codes.RANK_LOST, Outcome.FAULT),
        ("FAILED", exit_codes.BROKEN_ENVIRONMENT, Outcome.BROKEN_CLUSTER),
        ("FAILED", -9, Outcome.FAULT),  # the driver was killed
        ("FAILED", None, Outcome.FAULT),  # the job supervisor died: no exit code at all
        ("STOPPED", 1, Outcome.FAULT),  # stopped by someone else than us
    ],
)
def test_classify(status, code, outcome):
    assert classify(status, code, USER) is outcome


def test_user_error_codes_are_the_users_choice():
    assert classify("FAILED", 1, [2]) is Outcome.FAULT
    assert classify("FAILED", 42, [42]) is Outcome.USER_ERROR


def test_a_cluster_that_cannot_run_spillway_is_left_like_a_lost_one():
    # Even a user who lists its code cannot make it the job's fault (validate refuses that too).
    assert classify("FAILED", exit_codes.BROKEN_ENVIRONMENT, [78]) is Outcome.BROKEN_CLUSTER
    assert cluster_at_fault(Outcome.BROKEN_CLUSTER)
    assert not any(cluster_at_fault(o) for o in Outcome if o is not Outcome.BROKEN_CLUSTER)
    # Either strategy moves on and does not come back to it, not even last.
    lost = cluster_at_fault(classify("FAILED", exit_codes.BROKEN_ENVIRONMENT, USER))
    plan = recover("restart", "partner", ORDER, lost, 1, 3, "partner lacks torch")
    assert plan.next_clusters == ["third", "home"] and not plan.give_up
    assert recover("failover", "partner", ORDER, lost, 1, 3, "x").next_clusters == ["third", "home"]


def test_exit_code_from_the_field_or_the_message():
    assert exit_code_of(75, None) == 75
    assert exit_code_of(None, "Job entrypoint command failed with exit code -9, last logs") == -9
    assert exit_code_of(None, "Job supervisor actor died") is None


ORDER = ["home", "partner", "third"]


@pytest.mark.parametrize(
    ("failed", "lost", "expected"),
    [
        ("home", False, ["partner", "third", "home"]),
        ("partner", False, ["third", "home", "partner"]),
        ("third", True, ["home", "partner"]),
        ("elsewhere", False, ORDER),
    ],
)
def test_failover_goes_to_the_next_cluster_in_fleet_order(failed, lost, expected):
    assert Failover().next_clusters(failed, ORDER, lost) == expected


def test_restart_stays_unless_its_cluster_was_lost():
    assert Restart().next_clusters("partner", ORDER, False) == ["partner"]
    assert Restart().next_clusters("partner", ORDER, True) == ["third", "home"]


def test_recover_counts_restarts_and_gives_up():
    ok = recover("restart", "home", ORDER, False, 3, 3, "rank 1 died")
    assert not ok.give_up and ok.next_clusters == ["home"]
    assert ok.cause == "rank 1 died; restart 3/3 on home from the last committed checkpoint"
    out = recover("failover", "home", ORDER, False, 4, 3, "rank 1 died")
    assert out.give_up and out.cause == "rank 1 died; gave up after 3 restart(s)"
    none = recover("failover", "home", ORDER, False, 1, 0, "x")
    assert none.give_up
