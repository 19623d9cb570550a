"""Job and attempt states, and which job transitions the controller may make.

Pure names and a table, so the controller and the CLI (which reads states over the API) share
them. A job is the user's unit (what ``spillway launch`` creates); an attempt is one Ray
submission of it on one cluster. A job outlives many attempts: it is drained, migrated
or recovered by going back to the queue and starting a new attempt elsewhere.
"""

from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    PENDING = "PENDING"  # queued, waiting for a placement
    STARTING = "STARTING"  # placed; an attempt was submitted but is not yet seen running
    RUNNING = "RUNNING"
    DRAINING = "DRAINING"  # asked to checkpoint and stop (lease ending, preemption)
    MIGRATING = "MIGRATING"  # placed elsewhere; its checkpoint is being copied there
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TERMINAL: frozenset[JobState] = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

_S = JobState

ALLOWED: dict[JobState, set[JobState]] = {
    _S.PENDING: {_S.STARTING, _S.MIGRATING, _S.CANCELLED, _S.FAILED},
    _S.STARTING: {
        _S.RUNNING,
        _S.PENDING,  # the submission failed; queue it again
        _S.FAILED,
        _S.CANCELLED,
        _S.SUCCEEDED,  # short jobs can finish before a poll ever sees them run
    },
    _S.RUNNING: {
        _S.SUCCEEDED,
        _S.FAILED,
        _S.CANCELLED,
        _S.DRAINING,
        _S.PENDING,  # recovery: its cluster was lost, so back to the queue
    },
    _S.DRAINING: {_S.PENDING, _S.FAILED, _S.CANCELLED, _S.SUCCEEDED},
    # Placed on another cluster; its checkpoint is being copied there before the attempt starts.
    _S.MIGRATING: {_S.STARTING, _S.PENDING, _S.FAILED, _S.CANCELLED},
    # `spillway resume` of a finished job starts a new attempt from its last checkpoint.
    **{s: {_S.PENDING} for s in TERMINAL},
}


class AttemptState(str, Enum):
    PREPARING = "PREPARING"  # placed; the checkpoint is being copied to its cluster first
    SUBMITTED = "SUBMITTED"  # handed to the Ray Jobs API, not yet seen running
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"  # stopped by us (cancel)
    DRAINED = "DRAINED"  # checkpointed and stopped on request, to move elsewhere
    LOST = "LOST"  # its cluster vanished, its lease ended, or it ignored a drain: stopped unheard


# Attempts that may still run on a cluster: a restarted controller must reattach to these.
ACTIVE_ATTEMPT: frozenset[AttemptState] = frozenset({AttemptState.SUBMITTED, AttemptState.RUNNING})
# Attempts whose devices nobody else may take: a PREPARING one will start once its copy is done.
HOLDS_DEVICES: frozenset[AttemptState] = ACTIVE_ATTEMPT | {AttemptState.PREPARING}
