"""What the e2e modules share: asking the controller about a job, waiting, the controller's
heartbeat. One module, so that no test file imports another."""

from __future__ import annotations

import time
from pathlib import Path

from orchestrator.api.client import ApiClient
from orchestrator.api.discovery import read_client_file
from orchestrator.api.service import actor_name
from orchestrator.controller.state import ControllerState


def job(spillway, job_id: str) -> dict:
    """The job as `spillway status JOB --json` prints it, asked in-process: the tests poll it
    twice a second, and a new CLI process each time would take a core from the training they
    wait for. The CLI's own status is tested in test_jobs.py."""
    return ApiClient(read_client_file(str(spillway.home))).job(job_id)


# How long a case waits for what should take seconds to a minute: a bound that catches a hang,
# not a speed check, so it allows for a CI machine several times slower than this one.
WAIT_S = 240
# How long `spillway wait` may take for a whole job (and its CLI process a minute more).
JOB_WAIT_S = 480


def wait_for(predicate, timeout_s: float = WAIT_S, what: str = "condition", poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def controller_beat(home: Path) -> tuple[int, float, float] | None:
    with ControllerState.open(home / "controller.db") as state:
        return state.last_heartbeat(actor_name("local"))
