"""What the controller needs of one cluster, whatever runs it: the backend interface.

The Ray Jobs API implements it (backends.ray_jobs); the controller's unit tests implement it
in memory (tests/fake_cluster.py). Every method is one bounded call to the cluster: it
returns within the backend's timeout or raises BackendError naming the cluster and the call.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from orchestrator.runtime.spec import AttemptSpec

# Statuses as the Ray Jobs API names them; TERMINAL ones never change again.
PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED = (
    "PENDING",
    "RUNNING",
    "SUCCEEDED",
    "FAILED",
    "STOPPED",
)
TERMINAL = frozenset({SUCCEEDED, FAILED, STOPPED})


def submission_id(job_id: str, attempt: int) -> str:
    """Deterministic, so a controller that restarts mid-submit, or whose submit's answer was
    lost, looks the attempt up by this id instead of submitting it twice."""
    return f"{job_id}-a{attempt}"


class BackendError(RuntimeError):
    """A call to a cluster failed or timed out; `refused` when nothing listened at all (the
    head is gone), as against a cluster that accepted the call and did not answer."""

    def __init__(self, message: str, refused: bool = False, timed_out: bool = False) -> None:
        super().__init__(message)
        self.refused = refused
        self.timed_out = timed_out


@dataclass(frozen=True)
class JobInfo:
    status: str  # one of the statuses above
    exit_code: int | None  # the driver's, once it ended (None: unknown or still running)
    message: str  # the cluster's own words on how it ended, for the job's events


class ClusterBackend(Protocol):
    def submit(self, spec: AttemptSpec) -> str:
        """Submit the attempt under its deterministic submission id; returns that id. A second
        submit of the same id fails (the cluster already has it): ask exists() first."""

    def info(self, submission_id: str) -> JobInfo:
        """Status, exit code and message of one submission."""

    def exists(self, submission_id: str) -> bool:
        """Whether the cluster knows this submission id (a submit whose answer was lost)."""

    def list(self) -> list[str]:
        """Every submission id the cluster knows."""

    def stop(self, submission_id: str) -> bool:
        """Ask the cluster to stop the submission; False if it had already ended."""

    def logs(self, submission_id: str) -> str:
        """The driver's output so far."""

    def follow_logs(self, submission_id: str) -> Iterator[str]:
        """The driver's output as it comes, until the submission ends."""
