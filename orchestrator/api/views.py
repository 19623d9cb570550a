"""What the API answers about jobs, built from the controller's state: the JSON that
`spillway status --json` prints, the light progress `wait` polls, metrics and logs."""

from __future__ import annotations

import json
import logging

from orchestrator.api.problems import Conflict, NotFound, Upstream
from orchestrator.controller.controller import Controller
from orchestrator.controller.job_states import ACTIVE_ATTEMPT, TERMINAL, AttemptState
from orchestrator.controller.paths import run_files
from orchestrator.controller.state import AttemptRecord, ControllerState, JobRecord

log = logging.getLogger("spillway.api")


def require_job(state: ControllerState, job_id: str) -> JobRecord:
    job = state.get_job(job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


def attempts_json(state: ControllerState, job_id: str) -> list[dict]:
    """Each attempt's record, plus resume_s: from the previous attempt's drain or fault to this
    attempt's first step (what moving or recovering cost in wall time)."""
    out, before = [], None
    for a in state.attempts(job_id):
        row = {**{k: getattr(a, k) for k in a.__dataclass_fields__}, "state": a.state.value}
        since = before and (before.interrupted_at or before.ended_at)
        row["resume_s"] = a.first_step_at - since if since and a.first_step_at else None
        out.append(row)
        before = a
    return out


def job_json(state: ControllerState, job: JobRecord, detail: bool) -> dict:
    out = {
        "job_id": job.job_id, "name": job.name, "state": job.state.value, "reason": job.reason,
        "submitted_at": job.submitted_at, "updated_at": job.updated_at, "cost": job.cost_so_far,
        "restarts": job.restarts, "attempts": attempts_json(state, job.job_id),
    }  # fmt: skip
    if detail:
        out["overrides"] = list(job.overrides)
        out["checkpoints"] = [
            {"step": c.step, "cluster": c.cluster, "url": c.url, "bytes": c.bytes,
             "verified": c.verified, "recorded_at": c.recorded_at, "epoch": c.epoch,
             "manifest_digest": c.manifest_digest}
            for c in state.checkpoints(job.job_id)
        ]  # fmt: skip
        out["events"] = [
            {"at": e.at, "kind": e.kind, "from": e.from_state and e.from_state.value,
             "to": e.to_state and e.to_state.value, "cause": e.cause, "attempt": e.attempt}
            for e in state.events(job.job_id)
        ]  # fmt: skip
    return out


def jobs_json(state: ControllerState) -> dict:
    return {"jobs": [job_json(state, j, detail=False) for j in state.list_jobs()]}


def progress_json(controller: Controller, job_id: str) -> dict:
    """State, newest step and loss, and a PREPARING attempt's copy: cheap enough to poll each
    second (one small read of the newest metrics segment)."""
    job = require_job(controller.state, job_id)
    attempts = controller.state.attempts(job_id)
    newest = None
    clusters = controller.clusters() if attempts else {}
    for a in reversed(attempts):
        if a.cluster not in clusters:
            continue
        try:
            record = run_files(clusters[a.cluster], job_id, a.attempt).last_metrics()
        except OSError as exc:  # a store gone with its cluster: the bar just does not move
            log.warning("job %s attempt %d: cannot read metrics: %s", job_id, a.attempt, exc)
            continue
        if record:
            newest = {**record, "cluster": a.cluster, "attempt": a.attempt}
            break
    latest = attempts[-1] if attempts else None
    copy = None
    if latest and latest.state == AttemptState.PREPARING and latest.copy_bytes_total:
        copy = {
            "cluster": latest.cluster,
            "done": latest.copy_bytes_done,
            "total": latest.copy_bytes_total,
        }
    return {
        "job_id": job_id,
        "state": job.state.value,
        "reason": job.reason,
        "max_steps": json.loads(job.run_config)["trainer"]["max_steps"],
        "step": newest and newest.get("step"),
        "loss": newest and newest.get("loss"),
        "cluster": newest["cluster"] if newest else (latest and latest.cluster),
        "copy": copy,
    }


def job_metrics(controller: Controller, job_id: str) -> list[dict]:
    """Every metrics record of every attempt, read from each cluster's run files and tagged
    with its attempt and cluster; an attempt whose store cannot be read now gives nothing."""
    clusters = controller.clusters()
    lines: list[dict] = []
    for a in controller.state.attempts(job_id):
        if a.cluster not in clusters:
            continue
        try:
            records = run_files(clusters[a.cluster], job_id, a.attempt).read_metrics()
        except OSError as exc:
            log.warning("job %s attempt %d: cannot read metrics: %s", job_id, a.attempt, exc)
            continue
        lines += [{**r, "attempt": a.attempt, "cluster": a.cluster} for r in records]
    return lines


def job_logs(
    controller: Controller, job_id: str, number: int | None = None
) -> tuple[AttemptRecord, str] | None:
    """The Ray job logs of attempt `number` (default: the latest), or None before it was
    submitted. An earlier attempt's logs are there as long as its cluster keeps them."""
    state = controller.state
    attempt = state.latest_attempt(job_id) if number is None else state.get_attempt(job_id, number)
    if attempt is None or attempt.ray_job_id is None:
        return None
    cluster = controller.clusters()[attempt.cluster]
    return attempt, controller.backend(cluster).logs(attempt.ray_job_id)


def metrics_json(controller: Controller, job_id: str) -> dict:
    require_job(controller.state, job_id)
    return {"metrics": job_metrics(controller, job_id)}


def logs_json(
    controller: Controller, job_id: str, attempt: int | None, offset: int, only: int | None = None
) -> dict:
    """The latest attempt's Ray job logs from `offset` on, when `attempt` is that attempt;
    whole otherwise (a new attempt starts a new log). `only`: attempt `only`'s logs instead,
    whole. `done`: nothing more will be written."""
    job = require_job(controller.state, job_id)
    latest = controller.state.latest_attempt(job_id)
    if only is not None and (only < 1 or latest is None or only > latest.attempt):
        raise NotFound(f"job {job_id} has no attempt {only}")
    earlier = only is not None and only < latest.attempt
    try:
        found = job_logs(controller, job_id, only if earlier else None)
    except Exception as exc:  # the cluster's Jobs API, or a cluster gone from the fleet
        raise Upstream(f"cannot read the logs of job {job_id}: {exc}") from None
    if found is None:
        raise Conflict(f"job {job_id} has not started yet ({job.reason})")
    record, text = found
    start = offset if attempt == record.attempt and 0 <= offset <= len(text) and only is None else 0
    job = require_job(controller.state, job_id)
    latest = controller.state.latest_attempt(job_id)
    done = earlier or (
        job.state in TERMINAL
        and latest is not None
        and latest.attempt == record.attempt
        and latest.state not in ACTIVE_ATTEMPT
        and latest.state != AttemptState.PREPARING
    )
    return {
        "job_id": job_id,
        "attempt": record.attempt,
        "cluster": record.cluster,
        "ray_job_id": record.ray_job_id,
        "text": text[start:],
        "offset": len(text),
        "done": done,
    }
