"""Every write to the controller's state, as operations of one transaction.

A decision (placing an attempt, finishing one, a resume, a migration, a cancel) is several
writes; made through one Transaction they commit together or not at all, so a controller
killed between two of them leaves the state as before the decision, never half of it.

    with state.decision() as tx:
        attempt = tx.add_attempt(job_id, cluster, world_size, now)
        tx.transition(job_id, JobState.STARTING, cause, now, attempt.attempt)

ControllerState's own write methods are these, each in a transaction of its own.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from orchestrator.controller.job_states import ALLOWED, AttemptState, JobState
from orchestrator.controller.records import (
    AttemptRecord,
    Commit,
    InvalidTransition,
    JobNotFound,
    JobRecord,
    _attempt,
    _job,
)

# Columns update_attempt may set; the rest are identity or set once at creation.
ATTEMPT_FIELDS = frozenset(
    {
        "state",
        "ray_job_id",
        "started_at",
        "ended_at",
        "first_step",
        "last_step",
        "steps_redone",
        "exit_reason",
        "cost",
        "submitted_at",
        "first_step_at",
        "interrupted_at",
        "copy_step",
        "copy_bytes_done",
        "copy_bytes_total",
        "copy_s",
        "resumed_from_step",
        "released_at",
    }
)


class Transaction:
    """The writes of one BEGIN IMMEDIATE .. COMMIT; made by ControllerState.decision()."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def add_job(self, job: JobRecord, now: float) -> None:
        conn = self._conn
        conn.execute(
            "INSERT INTO jobs (job_id, name, state, priority, submitted_at, updated_at,"
            " waiting_since, run_config, overrides, world_sizes, device_types, clusters,"
            " budget, cost_so_far, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
            (
                job.job_id,
                job.name,
                JobState.PENDING.value,
                job.priority,
                now,
                now,
                now,
                job.run_config,
                json.dumps(list(job.overrides)),
                json.dumps(list(job.world_sizes)),
                json.dumps(list(job.device_types)),
                json.dumps(list(job.clusters)),
                job.budget,
                "submitted",
            ),
        )
        self._log(conn, job.job_id, now, "state", "submitted", to_state=JobState.PENDING)

    def transition(
        self,
        job_id: str,
        to: JobState,
        cause: str,
        now: float,
        attempt: int | None = None,
        expect: set[JobState] | None = None,
    ) -> JobRecord:
        """Move a job to ``to``, recording ``cause``; return the updated job.

        ``expect`` is a compare-and-set: the move happens only if the job is still in one
        of those states, so two actors that both saw RUNNING cannot both act on it.
        """
        to = JobState(to)
        conn = self._conn
        row = conn.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        current = JobState(row["state"])
        if expect is not None and current not in expect:
            wanted = ", ".join(sorted(s.value for s in expect))
            raise InvalidTransition(
                f"job {job_id}: expected it in {{{wanted}}} to move it to {to.value}, "
                f"but it is {current.value}"
            )
        if to not in ALLOWED[current]:
            allowed = ", ".join(sorted(s.value for s in ALLOWED[current]))
            raise InvalidTransition(
                f"job {job_id}: cannot go from {current.value} to {to.value} "
                f"(from {current.value} it may go to {allowed})"
            )
        # waiting_since restarts on every return to the queue: spill_after_s counts
        # from when the job last began waiting, not from its first submission.
        conn.execute(
            "UPDATE jobs SET state = ?, updated_at = ?, reason = ?,"
            " waiting_since = CASE WHEN ? THEN ? ELSE waiting_since END"
            " WHERE job_id = ?",
            (to.value, now, cause, to is JobState.PENDING, now, job_id),
        )
        self._log(conn, job_id, now, "state", cause, current, to, attempt)
        return _job(conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone())

    def set_reason(
        self, job_id: str, reason: str | None, now: float, detail: dict | None = None
    ) -> bool:
        """Record why a job is where it is (e.g. a wait reason); True if the reason changed.

        The placement loop calls this every tick for every waiting job: the reason is stable
        text, so an unchanged one writes no event; its live numbers (`detail`) go to their own
        column, rewritten only when they change."""
        conn = self._conn
        row = conn.execute(
            "SELECT reason, wait_detail FROM jobs WHERE job_id = ?", (job_id,)
        ).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        detail_text = json.dumps(detail, sort_keys=True) if detail else None
        if row["reason"] == reason and row["wait_detail"] == detail_text:
            return False
        conn.execute(
            "UPDATE jobs SET reason = ?, wait_detail = ?, updated_at = ? WHERE job_id = ?",
            (reason, detail_text, now, job_id),
        )
        if reason is not None and row["reason"] != reason:
            self._log(conn, job_id, now, "wait", reason)
        return row["reason"] != reason

    def set_backoff(self, job_id: str, failures: int, not_before: float) -> None:
        """How many attempts in a row could not start, and when the next may be placed."""
        cur = self._conn.execute(
            "UPDATE jobs SET failures = ?, not_before = ? WHERE job_id = ?",
            (failures, not_before, job_id),
        )
        if cur.rowcount == 0:
            raise JobNotFound(job_id)

    def prune_events(self, before: float) -> int:
        """Forget the events of finished jobs older than `before` (the retention period);
        a live job keeps its whole history. Returns how many rows went."""
        terminal = tuple(s.value for s in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED))
        marks = ", ".join("?" for _ in terminal)
        cur = self._conn.execute(
            f"DELETE FROM events WHERE at < ? AND job_id IN"
            f" (SELECT job_id FROM jobs WHERE state IN ({marks}))",
            (before, *terminal),
        )
        return cur.rowcount

    def heartbeat(self, name: str, pid: int, started_at: float, now: float) -> None:
        conn = self._conn
        conn.execute(
            "INSERT INTO controllers (name, pid, started_at, beat_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(name) DO UPDATE SET pid = excluded.pid,"
            " started_at = excluded.started_at, beat_at = excluded.beat_at",
            (name, pid, started_at, now),
        )

    def update_job_config(self, job_id: str, job: JobRecord) -> None:
        """Replace what a job runs (for `spillway resume JOB trainer.max_steps=...`)."""
        conn = self._conn
        cur = conn.execute(
            "UPDATE jobs SET run_config = ?, overrides = ?, world_sizes = ?, device_types = ?,"
            " clusters = ?, priority = ?, budget = ? WHERE job_id = ?",
            (
                job.run_config,
                json.dumps(list(job.overrides)),
                json.dumps(list(job.world_sizes)),
                json.dumps(list(job.device_types)),
                json.dumps(list(job.clusters)),
                job.priority,
                job.budget,
                job_id,
            ),
        )
        if cur.rowcount == 0:
            raise JobNotFound(job_id)

    def set_next_clusters(self, job_id: str, clusters: list[str] | None) -> None:
        """Pin where the job's next attempt goes (a migration, a recovery); None unpins."""
        conn = self._conn
        cur = conn.execute(
            "UPDATE jobs SET next_clusters = ? WHERE job_id = ?",
            (json.dumps(list(clusters)) if clusters is not None else None, job_id),
        )
        if cur.rowcount == 0:
            raise JobNotFound(job_id)

    def count_restart(self, job_id: str) -> int:
        """One more recovery after a fault; returns how many the job has had."""
        conn = self._conn
        cur = conn.execute("UPDATE jobs SET restarts = restarts + 1 WHERE job_id = ?", (job_id,))
        if cur.rowcount == 0:
            raise JobNotFound(job_id)
        return conn.execute("SELECT restarts FROM jobs WHERE job_id = ?", (job_id,)).fetchone()[0]

    def add_cost(self, job_id: str, amount: float) -> None:
        conn = self._conn
        cur = conn.execute(
            "UPDATE jobs SET cost_so_far = cost_so_far + ? WHERE job_id = ?",
            (amount, job_id),
        )
        if cur.rowcount == 0:
            raise JobNotFound(job_id)

    def add_event(
        self, job_id: str, kind: str, cause: str, now: float, attempt: int | None = None
    ) -> None:
        """Record something that happened to a job without a state change (submit, error)."""
        conn = self._conn
        self._log(conn, job_id, now, kind, cause, attempt=attempt)

    def add_attempt(
        self,
        job_id: str,
        cluster: str,
        world_size: int,
        now: float,
        resumed_from_step: int | None = None,
        state: AttemptState = AttemptState.SUBMITTED,
    ) -> AttemptRecord:
        """Create the job's next attempt (numbered 1, 2, ...), SUBMITTED unless it is PREPARING.

        The job's next_clusters pin is used up by this placement, so it is cleared with it.
        """
        conn = self._conn
        if conn.execute("SELECT 1 FROM jobs WHERE job_id = ?", (job_id,)).fetchone() is None:
            raise JobNotFound(job_id)
        (number,) = conn.execute(
            "SELECT COALESCE(MAX(attempt), 0) + 1 FROM attempts WHERE job_id = ?", (job_id,)
        ).fetchone()
        conn.execute(
            "INSERT INTO attempts (job_id, attempt, cluster, world_size, state, created_at,"
            " resumed_from_step) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                job_id,
                number,
                cluster,
                world_size,
                AttemptState(state).value,
                now,
                resumed_from_step,
            ),
        )
        conn.execute("UPDATE jobs SET next_clusters = NULL WHERE job_id = ?", (job_id,))
        row = conn.execute(
            "SELECT * FROM attempts WHERE job_id = ? AND attempt = ?", (job_id, number)
        ).fetchone()
        return _attempt(row)

    def update_attempt(self, job_id: str, attempt: int, **fields: Any) -> AttemptRecord:
        unknown = set(fields) - ATTEMPT_FIELDS
        if unknown:
            raise ValueError(
                f"update_attempt cannot set {sorted(unknown)}; settable: {sorted(ATTEMPT_FIELDS)}"
            )
        if "state" in fields:
            fields["state"] = AttemptState(fields["state"]).value
        conn = self._conn
        if fields:
            # Column names come from ATTEMPT_FIELDS, never from the caller's text.
            assignments = ", ".join(f"{name} = ?" for name in fields)
            conn.execute(
                f"UPDATE attempts SET {assignments} WHERE job_id = ? AND attempt = ?",
                (*fields.values(), job_id, attempt),
            )
        row = conn.execute(
            "SELECT * FROM attempts WHERE job_id = ? AND attempt = ?", (job_id, attempt)
        ).fetchone()
        if row is None:
            raise JobNotFound(f"{job_id} attempt {attempt}")
        return _attempt(row)

    def record_checkpoint(
        self,
        job_id: str,
        step: int,
        cluster: str,
        url: str,
        bytes: int,
        verified: bool,
        now: float,
        manifest_digest: str | None = None,
        epoch: int | None = None,
    ) -> None:
        """Insert or refresh what we know of one job's checkpoint at ``step`` on ``cluster``."""
        self._conn.execute(
            "INSERT INTO checkpoints (job_id, step, cluster, url, bytes, verified, recorded_at,"
            " manifest_digest, epoch) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (job_id, step, cluster) DO UPDATE SET url = excluded.url,"
            " bytes = excluded.bytes, verified = excluded.verified,"
            " recorded_at = excluded.recorded_at, manifest_digest = excluded.manifest_digest,"
            " epoch = excluded.epoch",
            (job_id, step, cluster, url, bytes, int(verified), now, manifest_digest, epoch),
        )

    def sync_checkpoints(
        self, job_id: str, cluster: str, url: str, found: dict[int, Commit], now: float
    ) -> None:
        """Enter the commits of one job on one cluster that its store holds now.

        ``found`` (step -> Commit) holds only the commits the caller accepts: those of the
        job's current attempt, with the digest their manifest had when first seen. A step
        already recorded keeps its first digest and epoch (a manifest rewritten later must
        not become the trusted one), and a verified copy stays verified. Steps gone from the
        store are dropped by drop_checkpoints (a whole listing) or forget_checkpoints."""
        conn = self._conn
        for step, commit in found.items():
            conn.execute(
                "INSERT INTO checkpoints (job_id, step, cluster, url, bytes, verified,"
                " recorded_at, manifest_digest, epoch) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?)"
                " ON CONFLICT (job_id, step, cluster) DO NOTHING",
                (job_id, step, cluster, url, commit.bytes, now, commit.digest, commit.epoch),
            )

    def drop_checkpoints(self, job_id: str, cluster: str, kept: list[int]) -> None:
        """Forget the job's checkpoints on `cluster` whose step is not in `kept` (gone from it)."""
        # NOT IN () is not SQL, and NOT IN (NULL) matches nothing: an empty store has an
        # impossible step instead.
        kept = list(kept) or [-1]
        marks = ", ".join("?" for _ in kept)
        self._conn.execute(
            f"DELETE FROM checkpoints WHERE job_id = ? AND cluster = ? AND step NOT IN ({marks})",
            (job_id, cluster, *kept),
        )

    def forget_checkpoints(self, job_id: str, cluster: str, steps: list[int]) -> None:
        """Forget the job's checkpoints at `steps` on `cluster` (the controller pruned them)."""
        self._conn.executemany(
            "DELETE FROM checkpoints WHERE job_id = ? AND cluster = ? AND step = ?",
            [(job_id, cluster, step) for step in steps],
        )

    @staticmethod
    def _log(
        conn: sqlite3.Connection,
        job_id: str,
        at: float,
        kind: str,
        cause: str,
        from_state: JobState | None = None,
        to_state: JobState | None = None,
        attempt: int | None = None,
    ) -> None:
        conn.execute(
            "INSERT INTO events (job_id, at, kind, from_state, to_state, cause, attempt)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                job_id,
                at,
                kind,
                from_state.value if from_state is not None else None,
                to_state.value if to_state is not None else None,
                cause,
                attempt,
            ),
        )
