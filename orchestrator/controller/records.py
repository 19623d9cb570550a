"""The rows of the controller's state as frozen values, and how a SQLite row becomes one."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field

from orchestrator.controller.job_states import AttemptState, JobState


class InvalidTransition(Exception):
    """A job state change that ALLOWED forbids, or whose compare-and-set ``expect`` failed."""


class JobNotFound(KeyError):
    pass


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    name: str
    run_config: str
    world_sizes: list[int]
    overrides: list[str] = field(default_factory=list)
    device_types: list[str] = field(default_factory=list)
    clusters: list[str] = field(default_factory=list)
    priority: int = 0
    budget: float | None = None
    # Set by the store: add_job ignores what the caller puts here.
    state: JobState = JobState.PENDING
    submitted_at: float = 0.0
    updated_at: float = 0.0
    waiting_since: float = 0.0
    cost_so_far: float = 0.0
    reason: str | None = None
    restarts: int = 0  # recoveries after faults so far
    # Where the next attempt should go, set by a migration or a recovery and cleared when it
    # is placed; None means the job's own placement.clusters.
    next_clusters: list[str] | None = None
    failures: int = 0  # attempts in a row that could not start
    not_before: float = 0.0  # no placement before this (back-off after those failures)
    wait_detail: dict | None = None  # the wait reason's live numbers


@dataclass(frozen=True)
class AttemptRecord:
    job_id: str
    attempt: int
    cluster: str
    world_size: int
    state: AttemptState
    created_at: float
    ray_job_id: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    first_step: int | None = None
    last_step: int | None = None
    resumed_from_step: int | None = None
    steps_redone: int = 0
    exit_reason: str | None = None
    cost: float = 0.0
    submitted_at: float | None = None  # handed to the cluster (after the copy, if any)
    first_step_at: float | None = None  # wall time its first step finished
    interrupted_at: float | None = None  # asked to drain, or its fault detected
    copy_step: int | None = None  # the checkpoint step copied here before it started
    copy_bytes_done: int = 0
    copy_bytes_total: int | None = None
    copy_s: float | None = None  # set once the copy is verified and committed
    released_at: float | None = None  # its cluster confirmed it no longer runs

    @property
    def epoch(self) -> int:
        """Fencing epoch: the attempt number, so every later attempt is newer."""
        return self.attempt


@dataclass(frozen=True)
class EventRecord:
    id: int
    job_id: str
    at: float
    kind: str
    cause: str
    from_state: JobState | None = None
    to_state: JobState | None = None
    attempt: int | None = None


@dataclass(frozen=True)
class Commit:
    """One committed checkpoint as the controller accepts it from a store."""

    bytes: int
    digest: str | None  # manifest.digest_of its bytes: "blake3:<hex>" (bare hex: older sha256)
    epoch: int | None  # the attempt that committed it


@dataclass(frozen=True)
class CheckpointRecord:
    job_id: str
    step: int
    cluster: str
    url: str
    bytes: int
    verified: bool
    recorded_at: float
    manifest_digest: str | None = None
    epoch: int | None = None


def _job(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        job_id=row["job_id"],
        name=row["name"],
        run_config=row["run_config"],
        world_sizes=json.loads(row["world_sizes"]),
        overrides=json.loads(row["overrides"]),
        device_types=json.loads(row["device_types"]),
        clusters=json.loads(row["clusters"]),
        priority=row["priority"],
        budget=row["budget"],
        state=JobState(row["state"]),
        submitted_at=row["submitted_at"],
        updated_at=row["updated_at"],
        waiting_since=row["waiting_since"],
        cost_so_far=row["cost_so_far"],
        reason=row["reason"],
        restarts=row["restarts"],
        next_clusters=json.loads(row["next_clusters"]) if row["next_clusters"] else None,
        failures=row["failures"],
        not_before=row["not_before"],
        wait_detail=json.loads(row["wait_detail"]) if row["wait_detail"] else None,
    )


def _attempt(row: sqlite3.Row) -> AttemptRecord:
    values = dict(row)
    values["state"] = AttemptState(values["state"])
    return AttemptRecord(**values)


def _event(row: sqlite3.Row) -> EventRecord:
    values = dict(row)
    for key in ("from_state", "to_state"):
        if values[key] is not None:
            values[key] = JobState(values[key])
    return EventRecord(**values)


def _checkpoint(row: sqlite3.Row) -> CheckpointRecord:
    values = dict(row)
    values["verified"] = bool(values["verified"])
    return CheckpointRecord(**values)
