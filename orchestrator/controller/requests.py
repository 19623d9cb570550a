"""What a user asks of the controller, written into its state for its loop to carry out.

The API server (orchestrator.api) calls these under the controller's lock and then wakes the
loop: a request records the change (a new PENDING job, a job marked CANCELLED, a finished job
back to PENDING, a running one DRAINING towards another cluster) and the next reconcile makes
the clusters match. Transitions are compare-and-set, so a request and the loop cannot both win.
"""

from __future__ import annotations

from omegaconf import DictConfig

from orchestrator.controller.job_states import TERMINAL, JobState
from orchestrator.controller.jobs import job_record
from orchestrator.controller.state import ControllerState, JobRecord

ACTIVE = {s for s in JobState if s not in TERMINAL}


def submit_job(state: ControllerState, cfg: DictConfig, overrides: list[str], now: float) -> str:
    job_id = state.new_job_id(now)
    state.add_job(job_record(job_id, cfg, overrides), now)
    return job_id


def cancel_job(state: ControllerState, job_id: str, now: float) -> JobRecord:
    """Mark the job CANCELLED; the controller stops its running attempt on the next loop."""
    job = state.get_job(job_id)
    if job is None or job.state in TERMINAL:
        return job
    return state.transition(job_id, JobState.CANCELLED, "cancelled by the user", now, expect=ACTIVE)


def resume_job(
    state: ControllerState, job_id: str, cfg: DictConfig, overrides: list[str], now: float
) -> JobRecord:
    """A finished job back to the queue, to continue from its latest committed checkpoint
    (which the controller copies to wherever the job is placed next)."""
    with state.decision() as tx:  # the new config and the move, together or not at all
        tx.update_job_config(job_id, job_record(job_id, cfg, overrides))
        return tx.transition(
            job_id, JobState.PENDING, "resumed by the user", now, expect=set(TERMINAL)
        )


def migrate_job(state: ControllerState, job_id: str, to: str, now: float) -> JobRecord:
    """Drain a running job and send it to cluster `to`, with its checkpoint."""
    cause = f"migration to {to} requested by the user"
    with state.decision() as tx:  # where it goes and the drain, together or not at all
        tx.set_next_clusters(job_id, [to])
        return tx.transition(job_id, JobState.DRAINING, cause, now, expect={JobState.RUNNING})
