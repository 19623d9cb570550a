"""What to do about one live attempt, given what its cluster said: a pure decision.

The loop observes (controller/observe.py), this module decides, and the controller applies
the decision in one transaction. No clock, no cluster, no state: every input is a value.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.backends.base import PENDING, RUNNING, TERMINAL, JobInfo, submission_id
from orchestrator.controller.job_states import AttemptState, JobState
from orchestrator.controller.observe import AttemptSeen
from orchestrator.controller.records import AttemptRecord


@dataclass(frozen=True)
class Nothing:
    """No news, or news that changes nothing."""


@dataclass(frozen=True)
class Confirm:
    """The cluster has the submission (a submit whose answer was lost, or a restart)."""

    ray_job_id: str


@dataclass(frozen=True)
class Resubmit:
    """The cluster never got it and no submit is under way: submit the same id again."""


@dataclass(frozen=True)
class Started:
    """Seen running for the first time."""


@dataclass(frozen=True)
class RequestDrain:
    pass


@dataclass(frozen=True)
class Finished:
    info: JobInfo


@dataclass(frozen=True)
class Acknowledged:
    """Its drain acknowledged and the acknowledged step's commit read: the job moves on while
    the attempt's process exits."""

    step: int


@dataclass(frozen=True)
class Lose:
    """End it unheard: `stop` asks the cluster to stop it too; `cluster_lost` tells recovery
    to leave the cluster as lost."""

    what: str
    cluster_lost: bool
    stop: bool


@dataclass(frozen=True)
class StopCancelled:
    pass


Decision = (
    Nothing
    | Confirm
    | Resubmit
    | Started
    | RequestDrain
    | Finished
    | Acknowledged
    | Lose
    | StopCancelled
)


@dataclass(frozen=True)
class Limits:
    drain_timeout_s: float
    submit_deadline_s: float


def watch(
    job_state: JobState,
    attempt: AttemptRecord,
    seen: AttemptSeen | None,
    cluster: str,
    cluster_verdict: str,
    lease_over: bool,
    submit_in_flight: bool,
    now: float,
    limits: Limits,
) -> Decision:
    """`cluster_verdict` is loss detection's up, suspect or lost; `seen` is None when this
    tick has no fresh word from the cluster on this attempt."""
    if job_state == JobState.CANCELLED:
        return StopCancelled()
    if cluster_verdict == "lost":
        return Lose(f"{cluster} lost while attempt {attempt.attempt} ran", True, stop=False)
    if lease_over:
        return Lose(f"the lease on {cluster} ended while attempt {attempt.attempt} ran", True, True)
    if seen is None or cluster_verdict != "up" or seen.error is not None:
        return Nothing()
    since = attempt.submitted_at or attempt.created_at
    if seen.known is False:
        if attempt.ray_job_id is not None:
            what = f"{cluster} no longer knows attempt {attempt.attempt} (its head restarted?)"
            return Lose(what, cluster_lost=False, stop=False)
        if submit_in_flight:
            return Nothing()
        if now - since > limits.submit_deadline_s:
            what = f"attempt {attempt.attempt} never reached {cluster} in {limits.submit_deadline_s:.0f}s"
            return Lose(what, cluster_lost=False, stop=False)
        return Resubmit()
    info = seen.info
    if info is None:
        return Nothing()
    if attempt.ray_job_id is None:
        return Confirm(submission_id(attempt.job_id, attempt.attempt))
    status = info.status
    if status in TERMINAL:
        return Finished(info)
    if status == PENDING and now - since > limits.submit_deadline_s:
        what = (
            f"attempt {attempt.attempt} still pending on {cluster} after "
            f"{limits.submit_deadline_s:.0f}s"
        )
        return Lose(what, cluster_lost=False, stop=True)
    if job_state == JobState.DRAINING:
        if attempt.interrupted_at is None:
            return RequestDrain()
        acked = (seen.ack or {}).get("step")
        if acked is not None and acked in (seen.commits or {}):
            # What is left is the process's exit (Ray's shutdown: 1-1.5 s measured); the next
            # attempt need not wait for it, only for the devices it still holds.
            return Acknowledged(acked)
        if now - attempt.interrupted_at > limits.drain_timeout_s:
            what = (
                f"attempt {attempt.attempt} did not acknowledge its drain within "
                f"{limits.drain_timeout_s:.0f}s"
            )
            return Lose(what, cluster_lost=False, stop=True)
    if status == RUNNING and attempt.state == AttemptState.SUBMITTED:
        return Started()
    return Nothing()


def release(seen: AttemptSeen | None, cluster_verdict: str, exiting: bool = False) -> str:
    """For an attempt that ended unheard (LOST, or stopped while unreachable) or that is
    exiting after its acknowledged drain: "released" once its cluster says it no longer runs,
    "stop" while it still does (an exiting one is waited for instead: stopping it would cut its
    last log lines), "wait" without word."""
    if seen is None or cluster_verdict != "up" or seen.error is not None:
        return "wait"
    if seen.known is False or (seen.info is not None and seen.info.status in TERMINAL):
        return "released"
    return "wait" if exiting else "stop"
