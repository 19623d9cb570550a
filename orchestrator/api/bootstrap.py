"""Start the fleet's controller on its home head when its API does not answer: a small Ray job
submitted through home's Jobs API (with home's token) gets or creates the controller actor;
then /v1/health is polled until it answers or a deadline passes.

Ray's JobSubmissionClient makes its HTTP requests without a timeout, so each of its calls here
runs on a helper thread that is waited on for a bounded time.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from orchestrator.api.client import ApiClient, ApiError, Unreachable
from orchestrator.api.protocol import BOOTSTRAP_MODULE, FLEET_ENV
from orchestrator.fleet.fleet import ClusterView
from orchestrator.fleet.tokens import auth_headers

START_DEADLINE_S = 120.0
RAY_CALL_TIMEOUT_S = 30.0

T = TypeVar("T")


def bounded(call: Callable[[], T], what: str, timeout_s: float = RAY_CALL_TIMEOUT_S) -> T:
    """call() on a daemon thread, or ApiError naming `what` once timeout_s has passed."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = call()
        except BaseException as exc:  # handed to the caller below
            result["error"] = exc

    worker = threading.Thread(target=run, name=f"bounded-{what}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise ApiError(f"{what}: no answer within {timeout_s:.0f}s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def start_controller(
    client: ApiClient,
    home: ClusterView,
    state_dir: str,
    fleet_cfg: dict,
    token_env_value: str | None = None,
    deadline_s: float = START_DEADLINE_S,
) -> dict:
    """The controller's /v1/health once it answers; ApiError with the bootstrap job's log tail
    if that job failed, or after deadline_s without an answer."""
    from ray.job_submission import JobSubmissionClient

    if not home.dashboard_url:
        raise ApiError(f"cannot start the controller: {home.name} has no dashboard URL")
    where = f"{home.name}'s Jobs API at {home.dashboard_url}"
    jobs = bounded(
        lambda: JobSubmissionClient(home.dashboard_url, headers=auth_headers(home.token)), where
    )
    env = {FLEET_ENV: json.dumps(fleet_cfg)}
    if home.local:
        env["SPILLWAY_HOME"] = state_dir  # this machine's; a remote head keeps its own
    token_env = (fleet_cfg.get("controller") or {}).get("token_env")
    if token_env and token_env_value:
        env[token_env] = token_env_value
    # A local head shares this machine's interpreter; a remote one brings its own.
    python = sys.executable if home.local else "python"
    boot = bounded(
        lambda: jobs.submit_job(
            entrypoint=f"{python} -m {BOOTSTRAP_MODULE}", runtime_env={"env_vars": env}
        ),
        where,
    )
    deadline = time.monotonic() + deadline_s
    last: ApiError | None = None
    while time.monotonic() < deadline:
        try:
            return client.health()
        except Unreachable as exc:
            last = exc
        status = str(bounded(lambda: jobs.get_job_status(boot), where))
        if status in ("FAILED", "STOPPED"):
            tail = bounded(lambda: jobs.get_job_logs(boot), where).strip().splitlines()[-15:]
            raise ApiError(
                f"the controller did not start on {home.name} (bootstrap job {boot} {status}); "
                "its log ends:\n" + "\n".join(tail)
            )
        time.sleep(0.5)
    raise ApiError(
        f"the controller was started on {home.name} but its API at {client.url} did not answer "
        f"within {deadline_s:.0f}s ({last})"
    )
