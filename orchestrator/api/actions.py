"""What the API's writing routes do to the controller's state. The server calls these under the
controller's lock and wakes the reconcile loop after each, so the clusters catch up at once."""

from __future__ import annotations

import time
from typing import Any

from orchestrator.api.problems import BadRequest, Conflict
from orchestrator.api.run_config import typed_run_config
from orchestrator.api.views import job_json, require_job
from orchestrator.config.errors import ConfigError
from orchestrator.controller.controller import Controller
from orchestrator.controller.job_states import TERMINAL, JobState
from orchestrator.controller.requests import cancel_job, migrate_job, resume_job, submit_job
from orchestrator.controller.state import InvalidTransition


def _body_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise BadRequest("body: must be a JSON object", key="body")
    return body


def _overrides(body: dict) -> list[str]:
    value = body.get("overrides", [])
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise BadRequest("overrides: must be a list of strings", key="overrides")
    return value


def _run_config(controller: Controller, body: dict):
    if "run_config" not in body:
        raise BadRequest("run_config: is required (the resolved run config)", key="run_config")
    try:
        return typed_run_config(body["run_config"], controller.fleet_cfg, controller.state_dir)
    except ConfigError as exc:
        raise BadRequest(f"bad config: {exc}", key=exc.key) from None


def submit(controller: Controller, body: Any) -> dict:
    body = _body_object(body)
    overrides = _overrides(body)
    cfg = _run_config(controller, body)
    return {"job_id": submit_job(controller.state, cfg, overrides, time.time())}


def cancel(controller: Controller, job_id: str) -> dict:
    require_job(controller.state, job_id)
    job = cancel_job(controller.state, job_id, time.time())
    return job_json(controller.state, job, detail=False)


def resume(controller: Controller, job_id: str, body: Any) -> dict:
    job = require_job(controller.state, job_id)
    body = _body_object(body)
    if job.state not in TERMINAL:
        raise Conflict(
            f"job {job_id} is {job.state.value}; only a finished, failed or cancelled job resumes"
        )
    overrides = _overrides(body)
    cfg = _run_config(controller, body)
    try:
        job = resume_job(controller.state, job_id, cfg, overrides, time.time())
    except InvalidTransition as exc:
        raise Conflict(str(exc)) from None
    return job_json(controller.state, job, detail=False)


def migrate(controller: Controller, job_id: str, body: Any) -> dict:
    job = require_job(controller.state, job_id)
    to = _body_object(body).get("to")
    clusters = list(controller.fleet_cfg.clusters)
    if not isinstance(to, str) or to not in clusters:
        raise BadRequest(
            f"to: no cluster {to!r} in fleet {controller.fleet_cfg.name} "
            f"(allowed: {', '.join(clusters)})",
            key="to",
        )
    if job.state != JobState.RUNNING:
        raise Conflict(f"job {job_id} is {job.state.value}; only a running job migrates")
    try:
        job = migrate_job(controller.state, job_id, to, time.time())
    except InvalidTransition as exc:
        raise Conflict(str(exc)) from None
    return job_json(controller.state, job, detail=False)
