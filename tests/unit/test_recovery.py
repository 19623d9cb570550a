"""The recovery rules: how an attempt's end is read, and where each strategy sends the job."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator import exit_codes
from orchestrator.backends.ray_jobs import exit_code_of
from orchestrator.controller.recovery import (
    Failover,
    Outcome,
    Restart,
    classify,
    cluster_at_fault,
    recover,
    skips_retries,
)

USER = [exit_codes.USER_ERROR, exit_codes.BAD_CONFIG]  # placement.user_error_exit_codes default
INFRA = Outcome.INFRASTRUCTURE

# Every exit code an attempt may end with, FAILED: (outcome on a healthy cluster, on one that
# lost a node or stopped answering).
FAILED_WITH = {
    exit_codes.USER_ERROR: (Outcome.USER_ERROR, INFRA),  # the recipe raised
    exit_codes.BAD_CONFIG: (Outcome.USER_ERROR, INFRA),
    exit_codes.NO_CAPACITY: (Outcome.NO_CAPACITY, Outcome.NO_CAPACITY),
    exit_codes.RANK_LOST: (INFRA, INFRA),
    exit_codes.INFRASTRUCTURE: (INFRA, INFRA),
    exit_codes.DRAINED: (Outcome.DRAINED, Outcome.DRAINED),
    exit_codes.FENCED: (Outcome.FENCED, Outcome.FENCED),
    exit_codes.BROKEN_ENVIRONMENT: (Outcome.BROKEN_CLUSTER, Outcome.BROKEN_CLUSTER),
    0: (INFRA, INFRA),  # FAILED yet 0: nothing says it was the job's
    42: (INFRA, INFRA),  # a code the user did not list
    -9: (INFRA, INFRA),  # the driver was killed
    -15: (INFRA, INFRA),
    None: (INFRA, INFRA),  # the job supervisor died: no exit code at all
}


def test_the_table_covers_every_code_in_exit_codes():
    named = {v for k, v in vars(exit_codes).items() if k.isupper() and isinstance(v, int)}
    assert named and named <= set(FAILED_WITH)


@pytest.mark.parametrize("healthy", [True, False])
@pytest.mark.parametrize("code", list(FAILED_WITH))
def test_classify_a_failed_job(code, healthy):
    expected = FAILED_WITH[code][0 if healthy else 1]
    assert classify("FAILED", code, USER, cluster_healthy=healthy) is expected


@pytest.mark.parametrize("healthy", [True, False])
@pytest.mark.parametrize("code", list(FAILED_WITH))
def test_a_succeeded_job_succeeded_and_one_we_stopped_was_cancelled(code, healthy):
    assert classify("SUCCEEDED", code, USER, healthy) is Outcome.SUCCEEDED
    assert classify("STOPPED", code, USER, healthy, stopped_by_us=True) is Outcome.CANCELLED


@pytest.mark.parametrize("healthy", [True, False])
@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (exit_codes.USER_ERROR, INFRA),  # someone else stopped it: not the job's fault
        (None, INFRA),
        (-15, INFRA),
        (exit_codes.RANK_LOST, INFRA),
        (exit_codes.DRAINED, Outcome.DRAINED),  # a SIGTERM from outside, drained: nothing lost
        (exit_codes.FENCED, Outcome.FENCED),
    ],
)
def test_a_job_stopped_by_someone_else(code, outcome, healthy):
    assert classify("STOPPED", code, USER, healthy) is outcome


def test_user_error_codes_are_the_users_choice():
    assert classify("FAILED", 1, [2], True) is INFRA
    assert classify("FAILED", 42, [42], True) is Outcome.USER_ERROR
    assert classify("FAILED", 42, [42], False) is INFRA


def test_a_listed_code_spillway_reserves_or_a_signal_is_never_the_users():
    for code in (*exit_codes.RESERVED, -9):
        assert classify("FAILED", code, [code], True) is not Outcome.USER_ERROR


def test_only_a_user_error_skips_retries():
    assert [o for o in Outcome if skips_retries(o)] == [Outcome.USER_ERROR]


CODES = st.one_of(
    st.none(), st.integers(-300, 300), st.sampled_from(sorted(exit_codes.RESERVED) + [1, 2])
)


@given(
    status=st.sampled_from(["SUCCEEDED", "FAILED", "STOPPED"]),
    code=CODES,
    listed=st.lists(st.integers(-300, 300) | st.sampled_from([1, 2, 69, 74, 75, 78]), max_size=6),
    healthy=st.booleans(),
    stopped_by_us=st.booleans(),
)
def test_only_a_listed_code_on_a_healthy_cluster_ever_skips_retries(
    status, code, listed, healthy, stopped_by_us
):
    outcome = classify(status, code, listed, healthy, stopped_by_us)
    users = (
        status == "FAILED"
        and healthy
        and code in listed
        and code is not None
        and code >= 1
        and code not in exit_codes.RESERVED
    )
    assert skips_retries(outcome) == users, (outcome, users)


def test_a_cluster_that_cannot_run_spillway_is_left_like_a_lost_one():
    # Even a user who lists its code cannot make it the job's fault (validate refuses that too).
    assert classify("FAILED", exit_codes.BROKEN_ENVIRONMENT, [78], True) is Outcome.BROKEN_CLUSTER
    assert cluster_at_fault(Outcome.BROKEN_CLUSTER)
    assert not any(cluster_at_fault(o) for o in Outcome if o is not Outcome.BROKEN_CLUSTER)
    # Either strategy moves on and does not come back to it, not even last.
    lost = cluster_at_fault(classify("FAILED", exit_codes.BROKEN_ENVIRONMENT, USER, True))
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
