"""The controller's durable state: jobs, their attempts, events and checkpoints, in SQLite.

One file (``$SPILLWAY_HOME/controller.db``, path chosen by the caller) so that a restarted
controller, or ``spillway status`` in another process, sees exactly what the running one
decided. WAL mode lets readers proceed while a writer commits; every write is a single
``BEGIN IMMEDIATE`` transaction, which takes the write lock before reading, so a
read-check-write (a state transition) cannot interleave with another connection's.

Times are epoch seconds passed in by the caller; nothing here reads a clock.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from orchestrator.controller.job_states import (
    ACTIVE_ATTEMPT,
    ALLOWED,
    HOLDS_DEVICES,
    AttemptState,
    JobState,
)
from orchestrator.controller.records import (  # noqa: F401 - re-exported for callers
    AttemptRecord,
    CheckpointRecord,
    EventRecord,
    InvalidTransition,
    JobNotFound,
    JobRecord,
    _attempt,
    _checkpoint,
    _event,
    _job,
)
from orchestrator.controller.schema import _SCHEMA, _UPGRADES, SCHEMA_VERSION

# Columns update_attempt may set; the rest are identity or set once at creation.
_ATTEMPT_FIELDS = frozenset(
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
    }
)

_ACTIVE = tuple(s.value for s in ACTIVE_ATTEMPT)
_ACTIVE_SQL = ", ".join("?" for _ in _ACTIVE)
_HOLDING = tuple(s.value for s in HOLDS_DEVICES)
_HOLDING_SQL = ", ".join("?" for _ in _HOLDING)


class ControllerState:
    """One connection to the controller database; safe to share between threads.

    Several of these (threads, a restarted controller, the CLI) may open the same file;
    SQLite's locking plus ``BEGIN IMMEDIATE`` keeps their writes serialized.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        # sqlite3 serializes calls, but not our BEGIN..COMMIT spans: one thread's
        # statements must not land inside another thread's transaction.
        self._lock = threading.Lock()
        # Ids handed out but not yet added, so two callers in the same minute cannot
        # both get the same one before either inserts it.
        self._issued: set[str] = set()

    @classmethod
    def open(cls, path: str | Path) -> ControllerState:
        db = Path(path)
        db.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN ourselves, so the sqlite3 module's
        # implicit deferred transactions never upgrade a read lock and fail as busy.
        conn = sqlite3.connect(db, check_same_thread=False, isolation_level=None, timeout=10.0)
        conn.row_factory = sqlite3.Row
        # busy_timeout first: switching to WAL needs a lock another opener may hold.
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA foreign_keys=ON")
        state = cls(conn)
        try:
            state._ensure_schema()
        except BaseException:
            conn.close()
            raise
        return state

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> ControllerState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                # A failed COMMIT can leave the transaction open; never let the next
                # caller's statements join it.
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def _ensure_schema(self) -> None:
        with self._write() as conn:
            has_jobs = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'"
            ).fetchone()
            row = (
                conn.execute("SELECT version FROM schema_version").fetchone() if has_jobs else None
            )
            if row is not None and row["version"] < SCHEMA_VERSION:
                for version in range(row["version"] + 1, SCHEMA_VERSION + 1):
                    for statement in _UPGRADES[version]:
                        conn.execute(statement)
                conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
                row = conn.execute("SELECT version FROM schema_version").fetchone()
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            if row is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif row["version"] != SCHEMA_VERSION:
                # A newer controller wrote this file; guessing at its layout could corrupt it.
                raise RuntimeError(
                    f"controller database has schema version {row['version']}, "
                    f"this spillway understands {SCHEMA_VERSION}"
                )

    # ---- jobs ---------------------------------------------------------------------------

    def new_job_id(self, now: float) -> str:
        """A readable id that sorts by submission minute, e.g. ``j-20261124-0542-3f9a``."""
        stamp = time.strftime("%Y%m%d-%H%M", time.gmtime(now))
        with self._lock:
            for tries in range(10_000):
                # Four hex digits keep ids short; only a burst of thousands of submissions
                # in one minute makes collisions common enough to need more.
                suffix = secrets.token_hex(2 if tries < 100 else 4)
                job_id = f"j-{stamp}-{suffix}"
                if job_id in self._issued:
                    continue
                taken = self._conn.execute(
                    "SELECT 1 FROM jobs WHERE job_id = ?", (job_id,)
                ).fetchone()
                if taken is None:
                    self._issued.add(job_id)
                    return job_id
        raise RuntimeError("could not find an unused job id")  # pragma: no cover

    def add_job(self, job: JobRecord, now: float) -> None:
        with self._write() as conn:
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
            self._issued.discard(job.job_id)  # the row now guards the id

    def get_job(self, job_id: str) -> JobRecord | None:
        rows = self._read("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def list_jobs(self, states: set[JobState] | None = None) -> list[JobRecord]:
        if states is None:
            rows = self._read("SELECT * FROM jobs ORDER BY submitted_at, job_id")
        else:
            values = tuple(JobState(s).value for s in states)
            marks = ", ".join("?" for _ in values)
            rows = self._read(
                f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY submitted_at, job_id",
                values,
            )
        return [_job(r) for r in rows]

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
        with self._write() as conn:
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

    def set_reason(self, job_id: str, reason: str | None, now: float) -> bool:
        """Record why a job is where it is (e.g. a wait reason); True if it changed.

        The placement loop calls this every tick, so an unchanged reason writes nothing.
        """
        with self._write() as conn:
            row = conn.execute("SELECT reason FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(job_id)
            if row["reason"] == reason:
                return False
            conn.execute(
                "UPDATE jobs SET reason = ?, updated_at = ? WHERE job_id = ?",
                (reason, now, job_id),
            )
            if reason is not None:
                self._log(conn, job_id, now, "wait", reason)
            return True

    def heartbeat(self, name: str, pid: int, started_at: float, now: float) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO controllers (name, pid, started_at, beat_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET pid = excluded.pid,"
                " started_at = excluded.started_at, beat_at = excluded.beat_at",
                (name, pid, started_at, now),
            )

    def last_heartbeat(self, name: str) -> tuple[int, float, float] | None:
        """(pid, started_at, beat_at) of the fleet's controller, if it ever ran."""
        rows = self._read(
            "SELECT pid, started_at, beat_at FROM controllers WHERE name = ?", (name,)
        )
        return (rows[0]["pid"], rows[0]["started_at"], rows[0]["beat_at"]) if rows else None

    def update_job_config(self, job_id: str, job: JobRecord) -> None:
        """Replace what a job runs (for `spillway resume JOB trainer.max_steps=...`)."""
        with self._write() as conn:
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
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET next_clusters = ? WHERE job_id = ?",
                (json.dumps(list(clusters)) if clusters is not None else None, job_id),
            )
            if cur.rowcount == 0:
                raise JobNotFound(job_id)

    def count_restart(self, job_id: str) -> int:
        """One more recovery after a fault; returns how many the job has had."""
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET restarts = restarts + 1 WHERE job_id = ?", (job_id,)
            )
            if cur.rowcount == 0:
                raise JobNotFound(job_id)
            return conn.execute("SELECT restarts FROM jobs WHERE job_id = ?", (job_id,)).fetchone()[
                0
            ]

    def add_cost(self, job_id: str, amount: float) -> None:
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET cost_so_far = cost_so_far + ? WHERE job_id = ?",
                (amount, job_id),
            )
            if cur.rowcount == 0:
                raise JobNotFound(job_id)

    # ---- events -------------------------------------------------------------------------

    def add_event(
        self, job_id: str, kind: str, cause: str, now: float, attempt: int | None = None
    ) -> None:
        """Record something that happened to a job without a state change (submit, error)."""
        with self._write() as conn:
            self._log(conn, job_id, now, kind, cause, attempt=attempt)

    def events(self, job_id: str) -> list[EventRecord]:
        rows = self._read("SELECT * FROM events WHERE job_id = ? ORDER BY id", (job_id,))
        return [_event(r) for r in rows]

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

    # ---- attempts -----------------------------------------------------------------------

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
        with self._write() as conn:
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
        unknown = set(fields) - _ATTEMPT_FIELDS
        if unknown:
            raise ValueError(
                f"update_attempt cannot set {sorted(unknown)}; settable: {sorted(_ATTEMPT_FIELDS)}"
            )
        if "state" in fields:
            fields["state"] = AttemptState(fields["state"]).value
        with self._write() as conn:
            if fields:
                # Column names come from _ATTEMPT_FIELDS, never from the caller's text.
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

    def attempts(self, job_id: str) -> list[AttemptRecord]:
        rows = self._read("SELECT * FROM attempts WHERE job_id = ? ORDER BY attempt", (job_id,))
        return [_attempt(r) for r in rows]

    def get_attempt(self, job_id: str, attempt: int) -> AttemptRecord:
        rows = self._read(
            "SELECT * FROM attempts WHERE job_id = ? AND attempt = ?", (job_id, attempt)
        )
        if not rows:
            raise JobNotFound(f"{job_id} attempt {attempt}")
        return _attempt(rows[0])

    def latest_attempt(self, job_id: str) -> AttemptRecord | None:
        rows = self._read(
            "SELECT * FROM attempts WHERE job_id = ? ORDER BY attempt DESC LIMIT 1", (job_id,)
        )
        return _attempt(rows[0]) if rows else None

    def active_attempts(self) -> list[AttemptRecord]:
        """Attempts that may still be running somewhere: what a restarted controller reattaches to."""
        rows = self._read(
            f"SELECT * FROM attempts WHERE state IN ({_ACTIVE_SQL})"
            " ORDER BY created_at, job_id, attempt",
            _ACTIVE,
        )
        return [_attempt(r) for r in rows]

    def preparing_attempts(self) -> list[AttemptRecord]:
        """Attempts placed on a cluster whose checkpoint copy has not finished starting them."""
        rows = self._read(
            "SELECT * FROM attempts WHERE state = ? ORDER BY created_at, job_id, attempt",
            (AttemptState.PREPARING.value,),
        )
        return [_attempt(r) for r in rows]

    def devices_in_use(self, cluster: str) -> int:
        """Devices held on ``cluster`` by attempts that are preparing, submitted or running."""
        rows = self._read(
            f"SELECT COALESCE(SUM(world_size), 0) FROM attempts"
            f" WHERE cluster = ? AND state IN ({_HOLDING_SQL})",
            (cluster, *_HOLDING),
        )
        return int(rows[0][0])

    # ---- checkpoints --------------------------------------------------------------------

    def record_checkpoint(
        self,
        job_id: str,
        step: int,
        cluster: str,
        url: str,
        bytes: int,
        verified: bool,
        now: float,
    ) -> None:
        """Insert or refresh what we know of one job's checkpoint at ``step`` on ``cluster``."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO checkpoints (job_id, step, cluster, url, bytes, verified, recorded_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (job_id, step, cluster) DO UPDATE SET url = excluded.url,"
                " bytes = excluded.bytes, verified = excluded.verified,"
                " recorded_at = excluded.recorded_at",
                (job_id, step, cluster, url, bytes, int(verified), now),
            )

    def sync_checkpoints(
        self, job_id: str, cluster: str, url: str, found: dict[int, int], now: float
    ) -> None:
        """Make the catalog of one job on one cluster match what its store holds now
        (``found``: step -> bytes): new steps are added unverified, pruned ones dropped, and a
        step already known as verified (a copy checked byte by byte) stays verified."""
        with self._write() as conn:
            for step, size in found.items():
                conn.execute(
                    "INSERT INTO checkpoints (job_id, step, cluster, url, bytes, verified,"
                    " recorded_at) VALUES (?, ?, ?, ?, ?, 0, ?)"
                    " ON CONFLICT (job_id, step, cluster) DO UPDATE SET bytes = excluded.bytes",
                    (job_id, step, cluster, url, size, now),
                )
            # NOT IN () is not SQL, and NOT IN (NULL) matches nothing: an empty store has an
            # impossible step instead.
            kept = list(found) or [-1]
            marks = ", ".join("?" for _ in kept)
            conn.execute(
                f"DELETE FROM checkpoints WHERE job_id = ? AND cluster = ? AND step NOT IN ({marks})",
                (job_id, cluster, *kept),
            )

    def checkpoints(self, job_id: str) -> list[CheckpointRecord]:
        """The job's checkpoints, newest step first."""
        rows = self._read(
            "SELECT * FROM checkpoints WHERE job_id = ? ORDER BY step DESC, cluster", (job_id,)
        )
        return [_checkpoint(r) for r in rows]
