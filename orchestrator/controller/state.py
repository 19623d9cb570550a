"""The controller's durable state: jobs, their attempts, events and checkpoints, in SQLite.

One file (``$SPILLWAY_HOME/controller.db``, path chosen by the caller) so that a restarted
controller, or ``spillway status`` in another process, sees exactly what the running one
decided. WAL mode lets readers proceed while a writer commits; every write is a single
``BEGIN IMMEDIATE`` transaction, which takes the write lock before reading, so a
read-check-write (a state transition) cannot interleave with another connection's.

Times are epoch seconds passed in by the caller; nothing here reads a clock.
"""

from __future__ import annotations

import functools
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from orchestrator.controller.job_states import (
    ACTIVE_ATTEMPT,
    HOLDS_DEVICES,
    AttemptState,
    JobState,
)
from orchestrator.controller.records import (  # noqa: F401 - re-exported for callers
    AttemptRecord,
    CheckpointRecord,
    Commit,
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
from orchestrator.controller.writes import Transaction

T = TypeVar("T")

_ACTIVE = tuple(s.value for s in ACTIVE_ATTEMPT)
_ACTIVE_SQL = ", ".join("?" for _ in _ACTIVE)
_HOLDING = tuple(s.value for s in HOLDS_DEVICES)
_HOLDING_SQL = ", ".join("?" for _ in _HOLDING)
# Attempts that can end without their cluster's word; they hold devices until released.
# Ended while it may still run: unheard (LOST), stopped while unreachable, or exiting after
# its acknowledged drain (DRAINED before its Ray job ended).
_UNHEARD = (AttemptState.LOST.value, AttemptState.STOPPED.value, AttemptState.DRAINED.value)


def _one_transaction(write: Callable[..., T]) -> Callable[..., T]:
    """A Transaction method as a ControllerState method that commits on its own."""

    @functools.wraps(write)
    def method(self: ControllerState, *args: Any, **kwargs: Any) -> T:
        with self.decision() as tx:
            return write(tx, *args, **kwargs)

    return method


class ControllerState:
    """One connection to the controller database; safe to share between threads.

    Several of these (threads, a restarted controller, the CLI) may open the same file;
    SQLite's locking plus ``BEGIN IMMEDIATE`` keeps their writes serialized.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        # sqlite3 serializes calls, but not our BEGIN..COMMIT spans: one thread's
        # statements must not land inside another thread's transaction.
        # Reentrant: a decision reads the state inside its own transaction (on this connection,
        # so it sees its own writes).
        self._lock = threading.RLock()
        # Ids handed out but not yet added, so two callers in the same minute cannot
        # both get the same one before either inserts it.
        self._issued: set[str] = set()

    @classmethod
    def open(cls, path: str | Path) -> ControllerState:
        db = Path(path)
        # The state dir holds every job's config and the fleet's records: its owner's only.
        db.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
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

    @contextmanager
    def decision(self) -> Iterator[Transaction]:
        """One decision's writes, committed together or not at all (see writes.py)."""
        with self._write() as conn:
            yield Transaction(conn)

    def add_job(self, job: JobRecord, now: float) -> None:
        with self.decision() as tx:
            tx.add_job(job, now)
        self._issued.discard(job.job_id)  # the row now guards the id

    transition = _one_transaction(Transaction.transition)
    set_reason = _one_transaction(Transaction.set_reason)
    heartbeat = _one_transaction(Transaction.heartbeat)
    update_job_config = _one_transaction(Transaction.update_job_config)
    set_next_clusters = _one_transaction(Transaction.set_next_clusters)
    count_restart = _one_transaction(Transaction.count_restart)
    add_cost = _one_transaction(Transaction.add_cost)
    add_event = _one_transaction(Transaction.add_event)
    add_attempt = _one_transaction(Transaction.add_attempt)
    update_attempt = _one_transaction(Transaction.update_attempt)
    record_checkpoint = _one_transaction(Transaction.record_checkpoint)
    sync_checkpoints = _one_transaction(Transaction.sync_checkpoints)
    drop_checkpoints = _one_transaction(Transaction.drop_checkpoints)
    set_backoff = _one_transaction(Transaction.set_backoff)
    prune_events = _one_transaction(Transaction.prune_events)

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

    def last_heartbeat(self, name: str) -> tuple[int, float, float] | None:
        """(pid, started_at, beat_at) of the fleet's controller, if it ever ran."""
        rows = self._read(
            "SELECT pid, started_at, beat_at FROM controllers WHERE name = ?", (name,)
        )
        return (rows[0]["pid"], rows[0]["started_at"], rows[0]["beat_at"]) if rows else None

    # ---- events -------------------------------------------------------------------------

    def events(self, job_id: str) -> list[EventRecord]:
        rows = self._read("SELECT * FROM events WHERE job_id = ? ORDER BY id", (job_id,))
        return [_event(r) for r in rows]

    # ---- attempts -----------------------------------------------------------------------

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
        """Devices held on ``cluster``: by attempts that are preparing, submitted or running,
        and by ones that ended unheard whose cluster has not yet confirmed they stopped (a
        partitioned attempt may still be training there)."""
        rows = self._read(
            f"SELECT COALESCE(SUM(world_size), 0) FROM attempts WHERE cluster = ? AND"
            f" (state IN ({_HOLDING_SQL}) OR (state IN (?, ?, ?) AND released_at IS NULL))",
            (cluster, *_HOLDING, *_UNHEARD),
        )
        return int(rows[0][0])

    def unreleased_attempts(self) -> list[AttemptRecord]:
        """Attempts that ended and may still run (LOST, STOPPED by a cancel, DRAINED and
        exiting): each is stopped, if need be, once its cluster answers, and released when it
        says so."""
        rows = self._read(
            "SELECT * FROM attempts WHERE state IN (?, ?, ?) AND released_at IS NULL"
            " ORDER BY created_at, job_id, attempt",
            _UNHEARD,
        )
        return [_attempt(r) for r in rows]

    # ---- checkpoints --------------------------------------------------------------------

    def checkpoints(self, job_id: str) -> list[CheckpointRecord]:
        """The job's checkpoints, newest step first (see checkpoint_line for which to use)."""
        rows = self._read(
            "SELECT * FROM checkpoints WHERE job_id = ? ORDER BY step DESC, cluster", (job_id,)
        )
        return [_checkpoint(r) for r in rows]
