"""The controller's pure decisions about a live attempt (controller/watch.py) and about which
checkpoint continues the job's line (controller/migration.line_sources)."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.backends.base import FAILED, PENDING, RUNNING, SUCCEEDED, JobInfo
from orchestrator.controller import watch as w
from orchestrator.controller.job_states import AttemptState, JobState
from orchestrator.controller.migration import line_sources
from orchestrator.controller.observe import AttemptSeen
from orchestrator.controller.records import AttemptRecord, CheckpointRecord
from orchestrator.fleet.fleet import ClusterView

T0 = 1_800_000_000.0
LIMITS = w.Limits(drain_timeout_s=60.0, submit_deadline_s=120.0)


def attempt(**kw) -> AttemptRecord:
    base = dict(
        job_id="j1",
        attempt=2,
        cluster="partner",
        world_size=2,
        state=AttemptState.SUBMITTED,
        created_at=T0,
        ray_job_id="j1-a2",
        submitted_at=T0,
    )
    return AttemptRecord(**{**base, **kw})


def seen(status: str | None = RUNNING, code: int | None = None, **kw) -> AttemptSeen:
    info = None if status is None else JobInfo(status, code, f"{status} message")
    return AttemptSeen(info=info, known=info is not None, **kw)


def decide(job_state=JobState.RUNNING, a=None, s=None, verdict="up", lease_over=False,
           in_flight=False, now=T0 + 10):  # fmt: skip
    return w.watch(
        job_state, a or attempt(), s, "partner", verdict, lease_over, in_flight, now, LIMITS
    )


def test_first_sight_of_a_running_attempt_starts_it():
    assert decide(s=seen(RUNNING)) == w.Started()
    running = attempt(state=AttemptState.RUNNING)
    assert decide(a=running, s=seen(RUNNING)) == w.Nothing()


def test_a_terminal_status_finishes_it_with_the_clusters_words():
    decision = decide(s=seen(FAILED, 74))
    assert decision == w.Finished(JobInfo(FAILED, 74, "FAILED message"))
    assert decide(s=seen(SUCCEEDED, 0)).info.status == SUCCEEDED


def test_no_fresh_word_decides_nothing_and_a_suspect_cluster_is_not_lost():
    assert decide(s=None) == w.Nothing()
    assert decide(s=seen(RUNNING), verdict="suspect") == w.Nothing()
    assert decide(s=AttemptSeen(error="timed out")) == w.Nothing()


def test_a_lost_cluster_loses_the_attempt_without_stopping_it():
    decision = decide(s=None, verdict="lost")
    assert isinstance(decision, w.Lose) and decision.cluster_lost and not decision.stop


def test_a_lease_that_ended_loses_and_stops_the_attempt():
    decision = decide(s=seen(RUNNING), lease_over=True)
    assert isinstance(decision, w.Lose) and decision.cluster_lost and decision.stop


def test_a_cancelled_job_stops_whatever_the_cluster_says():
    assert decide(JobState.CANCELLED, s=None, verdict="lost") == w.StopCancelled()


def test_a_submit_whose_answer_was_lost_is_settled_by_its_id():
    unconfirmed = attempt(ray_job_id=None, submitted_at=None)
    assert decide(a=unconfirmed, s=seen(PENDING)) == w.Confirm("j1-a2")
    # Not there, nothing under way: the same id goes again; while it is under way, nothing.
    missing = AttemptSeen(known=False)
    assert decide(a=unconfirmed, s=missing) == w.Resubmit()
    assert decide(a=unconfirmed, s=missing, in_flight=True) == w.Nothing()
    late = decide(a=unconfirmed, s=missing, now=T0 + LIMITS.submit_deadline_s + 1)
    assert isinstance(late, w.Lose) and not late.cluster_lost


def test_a_cluster_that_forgot_a_confirmed_attempt_loses_it():
    decision = decide(s=AttemptSeen(known=False))
    assert isinstance(decision, w.Lose) and not decision.stop


def test_an_attempt_pending_past_its_deadline_is_stopped_and_lost():
    assert decide(s=seen(PENDING), now=T0 + 60) == w.Nothing()
    decision = decide(s=seen(PENDING), now=T0 + LIMITS.submit_deadline_s + 1)
    assert isinstance(decision, w.Lose) and decision.stop


def test_a_drain_is_requested_once_then_given_its_timeout():
    running = attempt(state=AttemptState.RUNNING)
    assert decide(JobState.DRAINING, a=running, s=seen(RUNNING)) == w.RequestDrain()
    asked = dataclasses.replace(running, interrupted_at=T0)
    assert decide(JobState.DRAINING, a=asked, s=seen(RUNNING), now=T0 + 30) == w.Nothing()
    late = decide(JobState.DRAINING, a=asked, s=seen(RUNNING), now=T0 + 61)
    assert isinstance(late, w.Lose) and late.stop and "drain" in late.what


@pytest.mark.parametrize(
    ("s", "verdict", "expected"),
    [
        (None, "up", "wait"),
        (seen(RUNNING), "lost", "wait"),
        (seen(RUNNING), "suspect", "wait"),
        (AttemptSeen(error="timed out"), "up", "wait"),
        (seen(RUNNING), "up", "stop"),
        (seen(PENDING), "up", "stop"),
        (seen(FAILED, 76), "up", "released"),
        (AttemptSeen(known=False), "up", "released"),
    ],
)
def test_an_attempt_that_ended_unheard_is_released_only_on_the_clusters_word(s, verdict, expected):
    assert w.release(s, verdict) == expected


def view(name: str, kind: str) -> ClusterView:
    return ClusterView(
        name=name, kind=kind, local=False, address="a:1", dashboard_url="http://a:2",
        token=None, device_type="cpu", devices=4, device_resource="d",
        storage_root=f"/tmp/{name}", cost_per_device_hour=0.0, lease_start=None,
        lease_end=None, running=True,
    )  # fmt: skip


def ckpt(step: int, cluster: str, epoch: int | None, digest: str | None = "d") -> CheckpointRecord:
    return CheckpointRecord("j1", step, cluster, f"/{cluster}/ckpt", 10, False, T0, digest, epoch)


CLUSTERS = {"home": view("home", "owned"), "partner": view("partner", "leased")}


def test_the_newest_epochs_line_beats_a_higher_step_of_an_older_one():
    records = [ckpt(150, "partner", 1), ckpt(120, "home", 2), ckpt(100, "partner", 1)]
    order = [(s.cluster, s.step) for s in line_sources(records, "home", CLUSTERS)]
    assert order == [("home", 120), ("partner", 150), ("partner", 100)]


def test_on_a_tie_the_targets_own_copy_comes_first_and_digests_travel():
    records = [ckpt(100, "partner", 2, "abc"), ckpt(100, "home", 2, "abc")]
    first = line_sources(records, "home", CLUSTERS)[0]
    assert (first.cluster, first.manifest_digest) == ("home", "abc")
    assert line_sources(records, "partner", CLUSTERS)[0].cluster == "partner"


def test_a_partners_checkpoint_without_a_recorded_digest_is_never_a_source():
    records = [ckpt(200, "partner", 3, None), ckpt(100, "home", 2, None)]
    assert [(s.cluster, s.step) for s in line_sources(records, "home", CLUSTERS)] == [("home", 100)]


def test_a_cluster_no_longer_in_the_fleet_offers_nothing():
    records = [ckpt(100, "gone", 5), ckpt(50, "home", 4)]
    assert [s.cluster for s in line_sources(records, "home", CLUSTERS)] == ["home"]
