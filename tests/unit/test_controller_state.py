"""The controller's SQLite state: schema, transitions, attempts, checkpoints, concurrency."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from orchestrator.controller import schema
from orchestrator.controller import state as state_module
from orchestrator.controller.job_states import (
    ALLOWED,
    TERMINAL,
    AttemptState,
    JobState,
)
from orchestrator.controller.state import (
    Commit,
    ControllerState,
    InvalidTransition,
    JobNotFound,
    JobRecord,
)

T0 = 1_795_000_000.0  # a fixed "now"; the module never reads the clock
S = JobState


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "controller.db"


@pytest.fixture
def st(db: Path):
    state = ControllerState.open(db)
    yield state
    state.close()


def _job(st: ControllerState, now: float = T0, **kw) -> JobRecord:
    job = JobRecord(
        job_id=kw.pop("job_id", None) or st.new_job_id(now),
        name=kw.pop("name", "llama-8b"),
        run_config=kw.pop("run_config", "model: llama\n"),
        world_sizes=kw.pop("world_sizes", [4, 8]),
        **kw,
    )
    st.add_job(job, now)
    return job


def _count(db: Path, table: str) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def test_schema_created_and_wal_on(st: ControllerState, db: Path) -> None:
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"jobs", "attempts", "events", "checkpoints", "schema_version"} <= tables
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [
            (schema.SCHEMA_VERSION,)
        ]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_job_states_table_is_closed_over_states() -> None:
    assert set(ALLOWED) == set(JobState)
    for state in TERMINAL:
        assert ALLOWED[state] == {S.PENDING}
    assert S.SUCCEEDED in ALLOWED[S.STARTING]


def test_add_get_list_job(st: ControllerState) -> None:
    a = _job(st, T0, priority=2, overrides=["optim.lr=1e-4"], device_types=["h100"], budget=50.0)
    b = _job(st, T0 + 5, clusters=["owned-a", "lease-b"])
    got = st.get_job(a.job_id)
    assert got is not None
    assert got.state is S.PENDING
    assert (got.submitted_at, got.updated_at, got.waiting_since) == (T0, T0, T0)
    assert got.overrides == ["optim.lr=1e-4"] and got.world_sizes == [4, 8]
    assert got.device_types == ["h100"] and got.budget == 50.0 and got.priority == 2
    assert got.cost_so_far == 0.0 and got.reason == "submitted"
    assert st.get_job("j-nope") is None
    assert [j.job_id for j in st.list_jobs()] == [a.job_id, b.job_id]
    assert st.list_jobs({S.RUNNING}) == []
    st.transition(b.job_id, S.STARTING, "placed on owned-a", T0 + 6)
    assert [j.job_id for j in st.list_jobs({S.STARTING})] == [b.job_id]
    assert st.list_jobs({S.STARTING})[0].clusters == ["owned-a", "lease-b"]
    ev = st.events(a.job_id)
    assert [(e.kind, e.from_state, e.to_state, e.cause) for e in ev] == [
        ("state", None, S.PENDING, "submitted")
    ]


def test_full_lifecycle_events_in_order(st: ControllerState) -> None:
    job = _job(st)
    steps = [
        (S.STARTING, "placed on owned-a with 8 devices", 1),
        (S.RUNNING, "ray job reported RUNNING", 1),
        (S.SUCCEEDED, "ray job exited 0 at step 1000", 1),
    ]
    for i, (to, cause, attempt) in enumerate(steps, start=1):
        rec = st.transition(job.job_id, to, cause, T0 + i, attempt=attempt)
        assert rec.state is to and rec.updated_at == T0 + i and rec.reason == cause
    assert rec.waiting_since == T0  # only entering PENDING moves it
    ev = st.events(job.job_id)
    assert [(e.from_state, e.to_state, e.cause, e.at) for e in ev] == [
        (None, S.PENDING, "submitted", T0),
        (S.PENDING, S.STARTING, steps[0][1], T0 + 1),
        (S.STARTING, S.RUNNING, steps[1][1], T0 + 2),
        (S.RUNNING, S.SUCCEEDED, steps[2][1], T0 + 3),
    ]
    assert [e.attempt for e in ev] == [None, 1, 1, 1]
    assert all(e.kind == "state" for e in ev)
    assert ev == sorted(ev, key=lambda e: e.id)


def test_invalid_transition_raises_and_writes_nothing(st: ControllerState, db: Path) -> None:
    job = _job(st)
    before = (st.get_job(job.job_id), _count(db, "events"))
    with pytest.raises(InvalidTransition, match=r"PENDING to RUNNING"):
        st.transition(job.job_id, S.RUNNING, "skipping STARTING", T0 + 1)
    with pytest.raises(InvalidTransition, match=r"PENDING to PENDING"):
        st.transition(job.job_id, S.PENDING, "again", T0 + 1)
    assert (st.get_job(job.job_id), _count(db, "events")) == before
    with pytest.raises(JobNotFound):
        st.transition("j-missing", S.STARTING, "x", T0)


def test_compare_and_set_expect(st: ControllerState, db: Path) -> None:
    job = _job(st)
    st.transition(job.job_id, S.STARTING, "placed", T0 + 1)
    st.transition(job.job_id, S.RUNNING, "running", T0 + 2)
    # Two actors both saw RUNNING; the first drains it, the second (recovery) must lose.
    st.transition(job.job_id, S.DRAINING, "lease ends", T0 + 3, expect={S.RUNNING})
    events = _count(db, "events")
    with pytest.raises(InvalidTransition, match=r"expected .*RUNNING.* but it is DRAINING"):
        st.transition(job.job_id, S.PENDING, "cluster lost", T0 + 4, expect={S.RUNNING})
    got = st.get_job(job.job_id)
    assert got is not None and got.state is S.DRAINING and got.reason == "lease ends"
    assert _count(db, "events") == events


def test_resume_finished_job_goes_back_to_pending(st: ControllerState) -> None:
    job = _job(st)
    for i, to in enumerate([S.STARTING, S.RUNNING, S.FAILED], start=1):
        st.transition(job.job_id, to, f"to {to.value}", T0 + i)
    with pytest.raises(InvalidTransition):
        st.transition(job.job_id, S.STARTING, "skip the queue", T0 + 10)
    rec = st.transition(job.job_id, S.PENDING, "spillway resume", T0 + 100)
    assert rec.state is S.PENDING and rec.waiting_since == T0 + 100
    assert rec.submitted_at == T0  # FIFO position is still the original submission
    assert st.events(job.job_id)[-1].cause == "spillway resume"


def test_set_reason_logs_only_changes(st: ControllerState) -> None:
    job = _job(st)
    assert st.set_reason(job.job_id, "no cluster has 8 free h100", T0 + 1)
    assert not st.set_reason(job.job_id, "no cluster has 8 free h100", T0 + 2)
    assert st.set_reason(job.job_id, "budget exhausted", T0 + 3)
    got = st.get_job(job.job_id)
    assert got is not None and got.state is S.PENDING and got.reason == "budget exhausted"
    waits = [(e.cause, e.at) for e in st.events(job.job_id) if e.kind == "wait"]
    assert waits == [("no cluster has 8 free h100", T0 + 1), ("budget exhausted", T0 + 3)]


def test_attempts_numbering_active_and_devices(st: ControllerState) -> None:
    a, b = _job(st), _job(st)
    a1 = st.add_attempt(a.job_id, "owned-a", 8, T0 + 1, resumed_from_step=None)
    a2 = st.add_attempt(a.job_id, "lease-b", 4, T0 + 2, resumed_from_step=500)
    b1 = st.add_attempt(b.job_id, "owned-a", 2, T0 + 3, resumed_from_step=None)
    assert (a1.attempt, a2.attempt, b1.attempt) == (1, 2, 1)
    assert a1.state is AttemptState.SUBMITTED and a2.resumed_from_step == 500
    assert st.devices_in_use("owned-a") == 10
    assert st.devices_in_use("nowhere") == 0

    up = st.update_attempt(
        a.job_id, 1, state=AttemptState.RUNNING, ray_job_id="raysubmit_abc", started_at=T0 + 5
    )
    assert up.state is AttemptState.RUNNING and up.ray_job_id == "raysubmit_abc"
    st.update_attempt(
        a.job_id,
        1,
        state=AttemptState.DRAINED,
        ended_at=T0 + 9,
        first_step=0,
        last_step=499,
        exit_reason="lease ending",
        cost=3.5,
    )
    assert st.devices_in_use("owned-a") == 10  # drained, exiting: held until it is released
    st.update_attempt(a.job_id, 1, released_at=T0 + 10)
    assert st.devices_in_use("owned-a") == 2
    assert [(x.job_id, x.attempt) for x in st.active_attempts()] == [
        (a.job_id, 2),
        (b.job_id, 1),
    ]
    assert [x.attempt for x in st.attempts(a.job_id)] == [1, 2]
    latest = st.latest_attempt(a.job_id)
    assert latest is not None and latest.attempt == 2
    assert st.latest_attempt("j-none") is None
    first = st.attempts(a.job_id)[0]
    assert (first.last_step, first.cost, first.exit_reason) == (499, 3.5, "lease ending")

    with pytest.raises(ValueError, match="cluster"):
        st.update_attempt(a.job_id, 2, cluster="elsewhere")
    with pytest.raises(ValueError):
        st.update_attempt(a.job_id, 2, state="BOGUS")
    assert st.get_attempt(a.job_id, 2) == st.attempts(a.job_id)[1]
    with pytest.raises(JobNotFound):
        st.get_attempt(a.job_id, 9)
    with pytest.raises(JobNotFound):
        st.update_attempt(a.job_id, 9, state=AttemptState.LOST)
    with pytest.raises(JobNotFound):
        st.add_attempt("j-none", "owned-a", 1, T0, resumed_from_step=None)


def test_preparing_attempt_holds_devices_and_placement_uses_up_the_pin(
    st: ControllerState,
) -> None:
    a = _job(st)
    st.set_next_clusters(a.job_id, ["lease-b"])
    assert st.get_job(a.job_id).next_clusters == ["lease-b"]
    prep = st.add_attempt(a.job_id, "lease-b", 4, T0 + 1, state=AttemptState.PREPARING)
    assert prep.state is AttemptState.PREPARING
    assert st.get_job(a.job_id).next_clusters is None
    # Devices a copy is being made for are not free, but nothing runs there to reattach to.
    assert st.devices_in_use("lease-b") == 4
    assert st.active_attempts() == []
    assert [x.attempt for x in st.preparing_attempts()] == [1]
    st.update_attempt(a.job_id, 1, copy_step=40, copy_bytes_done=10, copy_bytes_total=100)
    done = st.update_attempt(a.job_id, 1, copy_s=1.5, state=AttemptState.SUBMITTED)
    assert (done.copy_step, done.copy_bytes_total, done.copy_s) == (40, 100, 1.5)
    assert st.preparing_attempts() == [] and st.devices_in_use("lease-b") == 4
    assert [st.count_restart(a.job_id), st.count_restart(a.job_id)] == [1, 2]
    assert st.get_job(a.job_id).restarts == 2
    with pytest.raises(JobNotFound):
        st.count_restart("j-none")


def test_a_version_1_state_file_is_upgraded_in_place(db: Path) -> None:
    with ControllerState.open(db) as st:
        job = _job(st)
        st.add_attempt(job.job_id, "owned-a", 2, T0 + 1)
    added: dict[str, set[str]] = {}
    for upgrade in [u for version in sorted(schema._UPGRADES) for u in schema._UPGRADES[version]]:
        table, column = upgrade.split()[2], upgrade.split(" ADD COLUMN ")[1].split()[0]
        added.setdefault(table, set()).add(column)
    with sqlite3.connect(db) as conn:  # what spillway 0.1 wrote: version 1, no new columns
        for table, columns in added.items():
            names = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
            kept = ", ".join(n for n in names if n not in columns)
            conn.execute(f"CREATE TABLE old_{table} AS SELECT {kept} FROM {table}")
            conn.execute(f"DROP TABLE {table}")
            conn.execute(f"ALTER TABLE old_{table} RENAME TO {table}")
        conn.execute("UPDATE schema_version SET version = 1")
    with ControllerState.open(db) as st:
        again = st.get_job(job.job_id)
        assert (again.name, again.restarts, again.next_clusters) == (job.name, 0, None)
        assert st.attempts(job.job_id)[0].copy_bytes_done == 0
        st.count_restart(job.job_id)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [
            (schema.SCHEMA_VERSION,)
        ]


def test_the_catalog_follows_the_store_keeping_first_digests_and_verified_copies(
    st: ControllerState,
) -> None:
    a = _job(st)
    st.record_checkpoint(a.job_id, 20, "lease-b", "mem://b", 100, True, T0, "d20", 1)  # a copy

    def sync(cluster: str, url: str, found: dict[int, Commit], now: float) -> None:
        with st.decision() as tx:
            tx.sync_checkpoints(a.job_id, cluster, url, found, now)
            tx.drop_checkpoints(a.job_id, cluster, list(found))

    sync("lease-b", "mem://b", {20: Commit(100, "d20", 1), 30: Commit(110, "d30", 2)}, T0 + 1)
    sync("owned-a", "mem://a", {10: Commit(90, "d10", 1)}, T0 + 1)
    rows = {(r.step, r.cluster): (r.verified, r.manifest_digest) for r in st.checkpoints(a.job_id)}
    assert rows == {
        (30, "lease-b"): (False, "d30"),
        (20, "lease-b"): (True, "d20"),
        (10, "owned-a"): (False, "d10"),
    }
    # A manifest rewritten after its commit does not become the trusted one; 20 was pruned.
    sync("lease-b", "mem://b", {30: Commit(110, "forged", 2), 40: Commit(120, "d40", 2)}, T0 + 2)
    assert [(r.step, r.cluster, r.manifest_digest) for r in st.checkpoints(a.job_id)] == [
        (40, "lease-b", "d40"),
        (30, "lease-b", "d30"),
        (10, "owned-a", "d10"),
    ]
    sync("owned-a", "mem://a", {}, T0 + 3)
    assert {r.cluster for r in st.checkpoints(a.job_id)} == {"lease-b"}


def test_add_cost(st: ControllerState) -> None:
    job = _job(st)
    st.add_cost(job.job_id, 1.25)
    st.add_cost(job.job_id, 2.0)
    got = st.get_job(job.job_id)
    assert got is not None and got.cost_so_far == pytest.approx(3.25)
    with pytest.raises(JobNotFound):
        st.add_cost("j-none", 1.0)


def test_checkpoint_upsert_newest_first(st: ControllerState) -> None:
    job = _job(st)
    st.record_checkpoint(job.job_id, 100, "owned-a", "s3://b/step-100", 10, False, T0)
    st.record_checkpoint(job.job_id, 200, "owned-a", "s3://b/step-200", 20, False, T0 + 1)
    st.record_checkpoint(job.job_id, 100, "owned-a", "s3://b/step-100", 11, True, T0 + 2)
    cps = st.checkpoints(job.job_id)
    assert [(c.step, c.bytes, c.verified, c.recorded_at) for c in cps] == [
        (200, 20, False, T0 + 1),
        (100, 11, True, T0 + 2),
    ]


def test_two_handles_and_reopen_see_same_data(db: Path) -> None:
    first = ControllerState.open(db)
    job = _job(first)
    first.add_attempt(job.job_id, "owned-a", 8, T0 + 1, resumed_from_step=None)
    # A second controller process (or the CLI) opening the same file.
    second = ControllerState.open(db)
    got = second.get_job(job.job_id)
    assert got is not None and got.state is S.PENDING
    second.transition(job.job_id, S.STARTING, "placed", T0 + 2, attempt=1)
    got = first.get_job(job.job_id)
    assert got is not None and got.state is S.STARTING
    first.close()
    second.close()

    reopened = ControllerState.open(db)
    try:
        got = reopened.get_job(job.job_id)
        assert got is not None and got.state is S.STARTING and got.reason == "placed"
        assert [a.attempt for a in reopened.active_attempts()] == [1]
        assert len(reopened.events(job.job_id)) == 2
    finally:
        reopened.close()
    assert _count(db, "schema_version") == 1


@pytest.mark.parametrize("shared", [True, False], ids=["one-handle", "handle-per-thread"])
def test_concurrent_writers_lose_nothing(db: Path, shared: bool) -> None:
    main = ControllerState.open(db)
    jobs = [_job(main).job_id for _ in range(4)]
    errors: list[BaseException] = []
    cycle = [S.STARTING, S.RUNNING, S.DRAINING, S.PENDING]  # 50 transitions = 12.5 cycles

    def work(job_id: str) -> None:
        st = main if shared else ControllerState.open(db)
        try:
            for i in range(50):
                st.transition(job_id, cycle[i % 4], f"step {i}", T0 + i)
                if i % 4 == 0:
                    n = st.add_attempt(job_id, "owned-a", 1, T0 + i, resumed_from_step=None)
                    st.update_attempt(job_id, n.attempt, state=AttemptState.RUNNING, last_step=i)
        except BaseException as e:  # surfaced below; a thread's exception is otherwise lost
            errors.append(e)
        finally:
            if not shared:
                st.close()

    threads = [threading.Thread(target=work, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for job_id in jobs:
        events = main.events(job_id)
        assert len(events) == 51
        assert [e.cause for e in events[1:]] == [f"step {i}" for i in range(50)]
        attempts = main.attempts(job_id)
        assert [a.attempt for a in attempts] == list(range(1, 14))
        assert all(a.state is AttemptState.RUNNING for a in attempts)
        got = main.get_job(job_id)
        assert got is not None and got.state is S.RUNNING  # step 49 is cycle[1]
    assert main.devices_in_use("owned-a") == 4 * 13
    main.close()


def test_job_ids_unique_readable_sortable(
    st: ControllerState, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [st.new_job_id(T0) for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(i.startswith("j-20261118-1106-") for i in ids)
    assert all(len(i) == len("j-20261124-0542-3f9a") for i in ids)
    assert st.new_job_id(T0 + 3600) > st.new_job_id(T0)
    # Ids already stored are never handed out again, even by a fresh handle that did not
    # issue them: force the random part to collide first and check it retries.
    taken = _job(st, job_id=ids[0]).job_id
    suffixes = iter([taken.rsplit("-", 1)[1], "beef"])
    monkeypatch.setattr(state_module.secrets, "token_hex", lambda n: next(suffixes))
    other = ControllerState.open(db)
    try:
        assert other.new_job_id(T0) == "j-20261118-1106-beef"
    finally:
        other.close()


def test_a_decision_killed_between_two_writes_leaves_nothing_of_itself(st, db):
    job = _job(st)
    with pytest.raises(RuntimeError, match="killed"):
        with st.decision() as tx:
            tx.add_attempt(job.job_id, "home", 4, T0 + 1)
            tx.transition(job.job_id, S.STARTING, "placed", T0 + 1, 1)
            raise RuntimeError("killed between the writes and the commit")
    reopened = ControllerState.open(db)
    assert reopened.attempts(job.job_id) == []
    assert reopened.get_job(job.job_id).state == S.PENDING
    with reopened.decision() as tx:  # and the store is usable after it
        attempt = tx.add_attempt(job.job_id, "home", 4, T0 + 2)
        tx.transition(job.job_id, S.STARTING, "placed", T0 + 2, attempt.attempt)
    assert st.get_job(job.job_id).state == S.STARTING and len(st.attempts(job.job_id)) == 1
    reopened.close()


def test_a_stable_wait_reason_writes_one_event_however_often_its_numbers_change(st):
    job = _job(st)
    before = len(st.events(job.job_id))
    for free in range(5):
        st.set_reason(job.job_id, "waiting for devices on home", T0 + free, {"free": free})
    assert len(st.events(job.job_id)) == before + 1
    assert st.get_job(job.job_id).wait_detail == {"free": 4}
    assert st.set_reason(job.job_id, "a lease ends too soon", T0 + 9) is True
    assert len(st.events(job.job_id)) == before + 2


def test_a_lost_attempt_holds_its_devices_until_its_cluster_releases_it(st):
    job = _job(st)
    st.add_attempt(job.job_id, "partner", 4, T0)
    st.update_attempt(job.job_id, 1, state=AttemptState.LOST, ended_at=T0 + 5)
    assert st.devices_in_use("partner") == 4
    assert [a.attempt for a in st.unreleased_attempts()] == [1]
    st.update_attempt(job.job_id, 1, released_at=T0 + 9)
    assert st.devices_in_use("partner") == 0 and st.unreleased_attempts() == []


def test_events_of_finished_jobs_go_after_the_retention_period_live_ones_stay(st):
    done, live = _job(st), _job(st)
    st.transition(done.job_id, S.CANCELLED, "cancelled", T0 + 1)
    events = len(st.events(done.job_id))
    assert st.prune_events(T0 + 100) == events > 0
    assert st.events(done.job_id) == [] and st.events(live.job_id) != []
