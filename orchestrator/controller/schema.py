"""The controller database's tables, and how an older file is brought up to date.

Kept apart from the store (state.py) that reads and writes them. Careful in the SQL text:
``_SCHEMA`` is split on semicolons, so none may appear inside a comment.
"""

from __future__ import annotations

SCHEMA_VERSION = 3

# What each version adds to the one before, so a state dir from an older spillway is upgraded
# in place instead of refused.
_UPGRADES: dict[int, list[str]] = {
    2: [
        "ALTER TABLE jobs ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN next_clusters TEXT",
        *(
            f"ALTER TABLE attempts ADD COLUMN {column}"
            for column in (
                "submitted_at REAL",
                "first_step_at REAL",
                "interrupted_at REAL",
                "copy_step INTEGER",
                "copy_bytes_done INTEGER NOT NULL DEFAULT 0",
                "copy_bytes_total INTEGER",
                "copy_s REAL",
            )
        ),
    ],
    3: [
        "ALTER TABLE jobs ADD COLUMN failures INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN not_before REAL NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN wait_detail TEXT",
        "ALTER TABLE attempts ADD COLUMN released_at REAL",
        "ALTER TABLE checkpoints ADD COLUMN manifest_digest TEXT",
        "ALTER TABLE checkpoints ADD COLUMN epoch INTEGER",
    ],
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    submitted_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    waiting_since REAL NOT NULL,
    run_config TEXT NOT NULL,             -- the composed run config, YAML or JSON text
    overrides TEXT NOT NULL DEFAULT '[]',  -- JSON list of the user's overrides
    world_sizes TEXT NOT NULL,            -- JSON list of ints
    device_types TEXT NOT NULL DEFAULT '[]',
    clusters TEXT NOT NULL DEFAULT '[]',
    budget REAL,
    cost_so_far REAL NOT NULL DEFAULT 0,
    reason TEXT,                          -- why it is in its state, e.g. a wait reason
    -- recoveries after faults, and where the next attempt goes if pinned (a JSON list)
    restarts INTEGER NOT NULL DEFAULT 0,
    next_clusters TEXT,
    -- attempts in a row that could not start (no capacity, a failed submit), and the back-off
    -- they earned, and the live numbers of the wait reason (JSON) apart from its stable text
    failures INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    wait_detail TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, submitted_at);
CREATE TABLE IF NOT EXISTS attempts (
    job_id TEXT NOT NULL REFERENCES jobs(job_id),
    attempt INTEGER NOT NULL,
    cluster TEXT NOT NULL,
    world_size INTEGER NOT NULL,
    ray_job_id TEXT,                      -- the Ray Jobs API submission id
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    first_step INTEGER,
    last_step INTEGER,
    resumed_from_step INTEGER,
    steps_redone INTEGER NOT NULL DEFAULT 0,
    exit_reason TEXT,
    cost REAL NOT NULL DEFAULT 0,
    submitted_at REAL,
    first_step_at REAL,
    -- when it was asked to drain or its fault was detected, and the checkpoint copied to its
    -- cluster before it started
    interrupted_at REAL,
    copy_step INTEGER,
    copy_bytes_done INTEGER NOT NULL DEFAULT 0,
    copy_bytes_total INTEGER,
    copy_s REAL,
    -- when its cluster confirmed it no longer runs: a LOST attempt holds its devices until then
    released_at REAL,
    PRIMARY KEY (job_id, attempt)
);
CREATE INDEX IF NOT EXISTS attempts_by_state ON attempts(state, cluster);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,                   -- state, wait, placement, submit, cancel, error
    from_state TEXT,
    to_state TEXT,
    cause TEXT NOT NULL,                  -- a human sentence: why this happened
    attempt INTEGER
);
CREATE INDEX IF NOT EXISTS events_by_job ON events(job_id, id);
CREATE TABLE IF NOT EXISTS controllers (
    name TEXT PRIMARY KEY,      -- one controller per fleet
    pid INTEGER NOT NULL,
    started_at REAL NOT NULL,
    beat_at REAL NOT NULL       -- written every loop: how the CLI knows the controller is alive
);
CREATE TABLE IF NOT EXISTS checkpoints (
    job_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    cluster TEXT NOT NULL,
    url TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    verified INTEGER NOT NULL,
    recorded_at REAL NOT NULL,
    -- sha256 of its manifest when it was committed, and the epoch (attempt) that committed it:
    -- a copy is used only if its manifest still has this digest
    manifest_digest TEXT,
    epoch INTEGER,
    PRIMARY KEY (job_id, step, cluster)
);
"""
