"""The reconcile loop through its failure windows, on the in-memory fleet: a crash between any
two writes, a submit whose answer was lost, a cancel mid-placement, a hung cluster, one that
comes back after it was declared lost, one removed from the fleet, a bad fleet."""

from __future__ import annotations

import sqlite3
import tempfile
import time
from pathlib import Path

import pytest

from orchestrator import exit_codes
from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.storage import open_root
from orchestrator.controller.job_states import AttemptState, JobState
from orchestrator.controller.paths import checkpoints_url
from orchestrator.controller.requests import cancel_job
from tests.controller_runs import (
    every_step_once,
    finished,
    launch,
    live_attempts,
    run_checked,
    state_of,
)
from tests.fake_cluster import FakeCluster, FakeFleet


@pytest.fixture
def root(spillway_home: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix="windows-", dir=spillway_home))


def two_owned(root: Path, **partner) -> FakeFleet:
    return FakeFleet(
        root, [FakeCluster("home", "owned", 2), FakeCluster("partner", "owned", 2, **partner)]
    )


@pytest.fixture
def fleet(root: Path):
    made = two_owned(root)
    yield made
    made.close()


class Crash(Exception):
    """The controller process dying at one statement: what it had not committed is gone."""


def crash_at(controller, statement: int, counting_from: str | None = None) -> dict:
    """Make the controller's state fail at its `statement`-th SQL write from now on, as a
    process killed there would; returns the counter (its "fired" says whether it did).
    `counting_from`: count only from the first write whose SQL (parameters filled in) holds
    that text, e.g. "state = 'SUCCEEDED'" for the attempt's finish."""
    conn: sqlite3.Connection = controller.state._conn
    counter = {"n": 0, "fired": False, "counting": counting_from is None}

    def trace(sql: str) -> None:
        if sql.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE", "COMMIT")):
            counter["counting"] = counter["counting"] or counting_from in sql
            counter["n"] += counter["counting"]

    def abort() -> int:
        if counter["n"] >= statement and not counter["fired"]:
            counter["fired"] = True
            return 1  # sqlite aborts the statement: the transaction rolls back
        return 0

    conn.set_trace_callback(trace)
    conn.set_progress_handler(abort, 1)
    return counter


# Every third write of a run: placement, submit, start, progress. A run of this job makes 69
# writes to its success on a quiet machine and as few as 66 under load (a tick's observation that
# misses its wait records no progress), so these stay below; the finish is counted from its
# own first write instead.
CRASH_POINTS = [(n, None) for n in range(1, 61, 3)]
FINISH_POINTS = [(n, "state = 'SUCCEEDED'") for n in range(1, 6)]  # the finish, and after


@pytest.mark.parametrize("statement, counting_from", CRASH_POINTS + FINISH_POINTS)
def test_a_controller_killed_at_any_write_comes_back_and_loses_nothing(
    root, statement, counting_from
):
    fleet = two_owned(root)
    controller = fleet.controller(root / "state")
    job_id = launch(controller, fleet, "trainer.max_steps=12", "checkpoint.every_steps=5")
    counter = crash_at(controller, statement, counting_from)
    fleet.run_until(controller, lambda: counter["fired"] or state_of(controller, job_id) in (
        JobState.SUCCEEDED, JobState.FAILED), max_s=120)  # fmt: skip
    ended = state_of(controller, job_id)
    assert counter["fired"], f"the run made {counter['n']} writes, fewer than {statement}: {ended}"
    controller = fleet.restart(controller)  # killed there; a fresh process on the same state
    try:
        run_checked(fleet, controller, job_id, max_s=200)
        assert state_of(controller, job_id) == JobState.SUCCEEDED
        attempts = controller.state.attempts(job_id)
        # Each attempt the state knows reached a cluster once at most, and nothing ran that
        # the state does not know.
        ran = [a for c in fleet.clusters.values() for a in c.attempts.values()]
        assert len(ran) <= len(attempts)
        assert {a.spec.attempt for a in ran} <= {a.attempt for a in attempts}
        steps = [r["step"] for r in every_step_once(fleet, controller, job_id)]
        assert steps[-1] == 12 and set(steps) == set(range(1, 13))
    finally:
        controller.close()
        fleet.close()


def test_a_submit_whose_answer_was_lost_is_settled_by_its_id_not_repeated(fleet, root):
    fleet["home"].accept_then_time_out()
    controller = fleet.controller(root / "state")
    try:
        job_id = launch(controller, fleet)
        run_checked(fleet, controller, job_id)
        assert state_of(controller, job_id) == JobState.SUCCEEDED
        (attempt,) = controller.state.attempts(job_id)
        assert attempt.ray_job_id == f"{job_id}-a1" and len(fleet["home"].attempts) == 1
        assert any("has " + attempt.ray_job_id in e.cause for e in controller.state.events(job_id))
    finally:
        controller.close()


def test_a_cancel_mid_placement_stops_the_attempt_and_frees_its_devices(fleet, root):
    controller = fleet.controller(root / "state")
    try:
        job_id = launch(controller, fleet, "trainer.max_steps=100")
        fleet.tick(controller)  # placed, its submit queued on home's lane
        cancel_job(controller.state, job_id, fleet.clock())
        fleet.run_until(
            controller,
            lambda: all(a.released_at for a in controller.state.attempts(job_id)),
            max_s=30,
        )
        (attempt,) = controller.state.attempts(job_id)
        assert (
            attempt.state == AttemptState.STOPPED
            and state_of(controller, job_id) == JobState.CANCELLED
        )
        assert live_attempts(fleet, job_id) == []
        assert controller.state.devices_in_use("home") == 0
    finally:
        controller.close()


def test_a_hung_cluster_holds_one_call_and_delays_nobody_else(root):
    fleet = two_owned(root, hang_s=2.0)
    controller = fleet.controller(root / "state")
    try:
        fleet["partner"].hang()
        job_id = launch(controller, fleet, "trainer.max_steps=12", "placement.clusters=[home]")
        hung_calls = []
        for _ in range(8):
            fleet.tick(controller)
            hung_calls.append(len(fleet["partner"].calls))
        run_checked(fleet, controller, job_id)
        assert state_of(controller, job_id) == JobState.SUCCEEDED
        # One call at a time on the hung lane, and the loop does not wait for it: while its
        # probe hangs the ticks go on without it, so its calls trickle instead of piling up.
        assert hung_calls[-1] <= 3, hung_calls
    finally:
        controller.close()
        fleet.close()


def test_a_partitioned_cluster_is_lost_its_zombie_fenced_and_the_line_continues(root):
    fleet = two_owned(root)
    controller = fleet.controller(root / "state")
    woken: list[int] = []
    controller.wake = lambda: woken.append(1)  # what the service runs the loop at once with
    try:
        job_id = launch(
            controller, fleet, "trainer.max_steps=40", "checkpoint.every_steps=5",
            "checkpoint.keep=2", "placement.clusters=[partner,home]",
        )  # fmt: skip
        fleet.run_until(
            controller, lambda: any(a.step >= 12 for a in fleet["partner"].attempts.values())
        )
        fleet["partner"].partition()
        fleet.run_until(
            controller,
            lambda: controller.state.attempts(job_id)[0].state == AttemptState.LOST,
            max_s=60,
        )
        lost = controller.state.attempts(job_id)[0]
        # Its devices stay booked while it may still run there.
        assert controller.state.devices_in_use("partner") == 2 and lost.released_at is None
        fleet.run_until(controller, lambda: len(controller.state.attempts(job_id)) == 2, max_s=60)
        second = controller.state.attempts(job_id)[1]
        assert second.cluster == "home" and second.resumed_from_step == 10
        fleet.run_until(controller, lambda: fleet["home"].live() != [], max_s=30)
        (resumed,) = fleet["home"].live()
        assert woken, "the copy's end did not wake the loop"
        # Step 10 was copied home with every byte checked: the ranks check sizes, not hashes.
        assert resumed.ckpt["resume_step"] == 10 and resumed.ckpt["resume_verified"] is True
        fleet.advance(20)  # the zombie trains on and reaches its next commit: fenced
        zombie = next(iter(fleet["partner"].attempts.values()))
        assert zombie.ckpt["resume_verified"] is False  # nothing was copied for it
        assert not zombie.live and zombie.exit_code == 76, zombie
        fleet["partner"].heal()
        time.sleep(fleet["partner"].hang_s + 0.1)  # the call that hung in real time returns
        run_checked(fleet, controller, job_id)
        assert state_of(controller, job_id) == JobState.SUCCEEDED
        # Its cluster answers again and says the zombie ended: its devices are free.
        fleet.run_until(
            controller, lambda: controller.state.attempts(job_id)[0].released_at, max_s=30
        )
        assert controller.state.devices_in_use("partner") == 0
        # The catalog never took a checkpoint of the zombie's after it was lost.
        partner_steps = {
            c.step for c in controller.state.checkpoints(job_id) if c.cluster == "partner"
        }
        assert max(partner_steps, default=0) <= 10
        # The zombie committed on past step 10 before its fence, yet pruned nothing: the
        # controller prunes, and keeps the step it told the next attempt to resume from.
        fs, path = open_root(checkpoints_url(fleet["partner"].view(), job_id))
        assert 10 in catalog.committed_steps(fs, path), catalog.committed_steps(fs, path)
        steps = [r["step"] for r in every_step_once(fleet, controller, job_id)]
        assert steps[-1] == 40
    finally:
        controller.close()
        fleet.close()


def test_the_controller_keeps_the_attempts_newest_checkpoints_and_forgets_the_pruned(fleet, root):
    controller = fleet.controller(root / "state")
    try:
        job_id = launch(controller, fleet, "trainer.max_steps=30", "checkpoint.keep=2")
        named_but_gone: list[tuple[float, set[int]]] = []

        def pruned() -> bool:  # the last prune runs on its lane; a later tick applies it
            stored = committed_on(fleet, "home", job_id)
            recorded = sorted(c.step for c in controller.state.checkpoints(job_id))
            if set(recorded) - set(stored):  # forgotten before deleted: never the other way
                named_but_gone.append((fleet.clock.now, set(recorded) - set(stored)))
            return stored == [30, 25] and recorded == [25, 30]

        fleet.run_until(controller, pruned, max_s=200)
        assert named_but_gone == [], named_but_gone
    finally:
        controller.close()


def test_a_controller_killed_between_forgetting_and_deleting_prunes_again_on_restart(fleet, root):
    """The folder of a cluster the job has left is pruned by no later commit: a controller
    killed after forgetting its old steps and before deleting them leaves them there, and the
    next controller deletes them on its first tick."""
    from orchestrator.controller.requests import migrate_job

    controller = fleet.controller(root / "state")
    try:
        job_id = launch(controller, fleet, "trainer.max_steps=200", "checkpoint.keep=2")
        fleet.run_until(controller, lambda: len(committed_on(fleet, "home", job_id)) == 2)
        fleet.run_until(controller, lambda: state_of(controller, job_id) == JobState.RUNNING)
        migrate_job(controller.state, job_id, "partner", fleet.clock())
        fleet.run_until(controller, lambda: [a.cluster.name for a in live_attempts(fleet, job_id)]
                        == ["partner"], max_s=60)  # fmt: skip
        controller = fleet.restart(controller)  # killed after forgetting step 5 on home, say
        fs, path = open_root(checkpoints_url(fleet["home"].view(), job_id))
        newest = committed_on(fleet, "home", job_id)[0]
        fs.copy(catalog.step_dir(path, newest), catalog.step_dir(path, 1), recursive=True)
        assert 1 in committed_on(fleet, "home", job_id)  # a whole old checkpoint nothing names
        fleet.run_until(controller, lambda: 1 not in committed_on(fleet, "home", job_id), max_s=5)
        recorded = {c.step for c in controller.state.checkpoints(job_id) if c.cluster == "home"}
        assert recorded == set(committed_on(fleet, "home", job_id)), recorded
        run_checked(fleet, controller, job_id)
        assert state_of(controller, job_id) == JobState.SUCCEEDED
    finally:
        controller.close()


def test_a_users_exit_code_is_the_users_only_on_a_cluster_that_has_all_its_devices(fleet, root):
    controller = fleet.controller(root / "state")
    try:
        healthy = launch(controller, fleet, "placement.clusters=[home]")
        fleet["home"].fail_at(3, exit_codes.USER_ERROR, "ValueError: the user's model is wrong")
        fleet.run_until(controller, finished(controller, healthy))
        assert state_of(controller, healthy) == JobState.FAILED
        assert len(controller.state.attempts(healthy)) == 1  # a user error is not retried

        # The same exit while a node of the cluster is gone: the cluster's fault, retried.
        hit = launch(controller, fleet, "placement.clusters=[home]")
        fleet["home"].fail_at(3, exit_codes.USER_ERROR, "RuntimeError: a peer went away")
        fleet.run_until(controller, lambda: fleet["home"].live() != [])
        fleet["home"].lost_devices = 1
        fleet.run_until(controller, lambda: len(controller.state.attempts(hit)) == 2, max_s=60)
        fleet["home"].lost_devices = 0
        run_checked(fleet, controller, hit)
        assert state_of(controller, hit) == JobState.SUCCEEDED
        first = controller.state.attempts(hit)[0]
        assert first.state == AttemptState.FAILED, first
    finally:
        controller.close()


@pytest.mark.parametrize("answered_first, heals", [(False, True), (False, False), (True, True)])
def test_placement_waits_for_a_cluster_whose_first_probes_failed_then_goes_on(
    root, answered_first, heals
):
    fleet = two_owned(root)
    controller = fleet.controller(root / "state")
    if answered_first:  # one answer, then a probe that times out under load: still unknown
        fleet.tick(controller)
        assert controller._loss["partner"].last_ok_at is not None
    fleet["partner"].hang()  # no answer (now or from the start), not lost yet
    try:
        job_id = launch(controller, fleet, "placement.clusters=[partner,home]")
        for _ in range(4):
            fleet.tick(controller)
        assert controller.state.attempts(job_id) == []  # not sent past it while it is unknown
        if heals:
            fleet["partner"].heal()
            time.sleep(fleet["partner"].hang_s + 0.1)  # the probe that hung in real time
        fleet.run_until(controller, lambda: controller.state.attempts(job_id), max_s=30)
        placed = controller.state.attempts(job_id)[0]
        # Answered: the job goes where it prefers. Never answered: lost, so the next one.
        assert placed.cluster == ("partner" if heals else "home"), placed
    finally:
        controller.close()
        fleet.close()


def test_a_probe_that_times_out_long_after_the_start_sends_no_job_past_its_cluster(root):
    """Under load a probe times out now and then (e2e on two cores: a dashboard slow for 2 s).
    A job that prefers that cluster waits for its next answer rather than going elsewhere."""
    fleet = two_owned(root)
    controller = fleet.controller(root / "state")
    try:
        for _ in range(30):  # long past the first seconds, well past lost_after_s
            fleet.tick(controller)
        fleet["partner"].hang()
        fleet.run_until(controller, lambda: controller._loss["partner"].failing_since is not None)
        job_id = launch(controller, fleet, "placement.clusters=[partner,home]")
        for _ in range(3):
            fleet.tick(controller)
        assert controller.state.attempts(job_id) == []
        reason = controller.state.get_job(job_id).reason
        assert reason.startswith("waiting for an answer from partner"), reason
        fleet["partner"].heal()
        time.sleep(fleet["partner"].hang_s + 0.1)  # the probe that hung in real time
        fleet.run_until(controller, lambda: controller.state.attempts(job_id), max_s=30)
        assert controller.state.attempts(job_id)[0].cluster == "partner"
    finally:
        controller.close()
        fleet.close()


def test_a_restart_told_a_step_that_does_not_verify_passes_it_over_next_time(fleet, root):
    controller = fleet.controller(root / "state")
    try:
        job_id = launch(
            controller, fleet, "trainer.max_steps=20", "placement.clusters=[home]",
            "placement.recovery=restart",
        )  # fmt: skip
        fleet.run_until(controller, lambda: any(a.step >= 12 for a in fleet["home"].live()))
        fs, path = open_root(checkpoints_url(fleet["home"].view(), job_id))
        weights = f"{catalog.step_dir(path, 10)}/model.bin"
        data = bytearray(fs.cat_file(weights))
        data[3] ^= 0xFF  # same size: only its sha256 tells
        fs.pipe_file(weights, bytes(data))
        fleet["home"].die()
        run_checked(fleet, controller, job_id)
        assert state_of(controller, job_id) == JobState.SUCCEEDED
        killed, refused, last = controller.state.attempts(job_id)
        assert refused.resumed_from_step == 10 and "does not verify" in refused.exit_reason
        assert last.resumed_from_step == 5, last  # the one before it, not step 10 again
        assert any("checkpoint step 10 on home does not verify, passed over" in e.cause
                   for e in controller.state.events(job_id))  # fmt: skip
        steps = [r["step"] for r in every_step_once(fleet, controller, job_id)]
        assert steps[-1] == 20
    finally:
        controller.close()


def test_a_cluster_removed_from_the_fleet_loses_its_attempt_and_the_job_moves(root):
    fleet = two_owned(root)
    controller = fleet.controller(root / "state")
    try:
        job_id = launch(
            controller, fleet, "trainer.max_steps=30", "placement.clusters=[partner,home]"
        )
        fleet.run_until(
            controller, lambda: any(a.step >= 7 for a in fleet["partner"].attempts.values())
        )
        fleet.remove("partner")  # out of reach for good: what still runs there, runs on
        fleet.run_until(controller, finished(controller, job_id), max_s=200)
        first, second = controller.state.attempts(job_id)
        assert first.state == AttemptState.LOST and "no longer in the fleet" in first.exit_reason
        # Its storage left the fleet with it: nothing of its line can be read, so from step 0.
        assert (second.cluster, second.resumed_from_step) == ("home", None)
        assert state_of(controller, job_id) == JobState.SUCCEEDED
    finally:
        controller.close()
        fleet.close()


def test_a_refused_head_is_lost_within_seconds_and_a_blip_never(root):
    fleet = two_owned(root)
    fleet["partner"].answer_s = 0.3  # probes answer late, as on a loaded machine
    controller = fleet.controller(root / "state")
    try:
        job_id = launch(
            controller, fleet, "trainer.max_steps=200", "placement.clusters=[partner,home]"
        )
        fleet.run_until(controller, lambda: state_of(controller, job_id) == JobState.RUNNING)
        fleet["partner"].refuse()
        for _ in range(3):
            fleet.tick(controller)
        fleet["partner"].heal()
        for _ in range(5):
            fleet.tick(controller)
        assert controller.state.attempts(job_id)[0].state == AttemptState.RUNNING  # a blip
        fleet["partner"].refuse()
        lost_at = None
        for second in range(1, 12):
            fleet.tick(controller)
            if controller.state.attempts(job_id)[0].state == AttemptState.LOST:
                lost_at = second
                break
        assert lost_at is not None and lost_at <= 7, lost_at
    finally:
        controller.close()
        fleet.close()


def test_a_fleet_that_cannot_be_resolved_fails_its_tick_alone(fleet, root):
    controller = fleet.controller(root / "state")
    try:
        job_id = launch(controller, fleet)
        broken = {"on": True}
        good = controller._fleet

        def flaky():
            if broken["on"]:
                raise ValueError("fleet.clusters.partner.lease_end: not a time")
            return good()

        controller._fleet = flaky
        fleet.tick(controller)  # logged, nothing decided, nothing raised
        assert state_of(controller, job_id) == JobState.PENDING
        broken["on"] = False
        run_checked(fleet, controller, job_id)
        assert state_of(controller, job_id) == JobState.SUCCEEDED
    finally:
        controller.close()


def committed_on(fleet: FakeFleet, cluster: str, job_id: str) -> list[int]:
    fs, path = open_root(checkpoints_url(fleet[cluster].view(), job_id))
    return catalog.committed_steps(fs, path)


def test_a_migrate_refused_half_way_changes_nothing(fleet, root):
    """resume and migrate are one transaction each: a migrate of a job that is not running
    pins nowhere (its compare-and-set fails, and the pin written before it rolls back)."""
    from orchestrator.controller.requests import migrate_job
    from orchestrator.controller.state import InvalidTransition

    controller = fleet.controller(root / "state")
    try:
        job_id = launch(controller, fleet)
        with pytest.raises(InvalidTransition):
            migrate_job(controller.state, job_id, "partner", fleet.clock())
        assert controller.state.get_job(job_id).next_clusters is None
    finally:
        controller.close()


def test_an_attempt_exiting_after_its_drain_ack_hurries_the_loop(root):
    """From a drain's request to the Ray job's end the loop looks again at once
    (Controller.hurried), since the acknowledgement starts the next attempt and the end frees
    the devices; before the request and once the attempt ended, it keeps its usual period."""
    from orchestrator.controller.requests import migrate_job

    fleet = FakeFleet(
        root, [FakeCluster("home", "owned", 2, exit_s=5.0), FakeCluster("partner", "owned", 2)]
    )
    controller = fleet.controller(root / "state")
    try:
        job_id = launch(controller, fleet, "trainer.max_steps=40")
        fleet.run_until(controller, lambda: state_of(controller, job_id) == JobState.RUNNING)
        fleet.tick(controller)
        assert not controller.hurried()
        migrate_job(controller.state, job_id, "partner", fleet.clock())
        fleet.run_until(controller, controller.hurried, max_s=30)
        (exiting,) = live_attempts(fleet, job_id)
        assert exiting.cluster.name == "home"
        fleet.run_until(controller, lambda: exiting.run_dir.drain_ack() is not None, max_s=30)
        fleet.tick(controller)
        assert controller.hurried() and exiting.status == "RUNNING"  # acknowledged, exiting
        fleet.run_until(controller, lambda: not controller.hurried(), max_s=30)
        assert all(a.cluster.name == "partner" for a in live_attempts(fleet, job_id))
        run_checked(fleet, controller, job_id)
        assert state_of(controller, job_id) == JobState.SUCCEEDED
        assert [a.cluster for a in controller.state.attempts(job_id)] == ["home", "partner"]
    finally:
        controller.close()
        fleet.close()


@pytest.mark.parametrize("exit_s", [5.0, 1000.0])
def test_a_drained_attempt_hands_over_at_its_ack_and_holds_its_devices_until_it_ends(root, exit_s):
    """The next attempt starts once the drain is acknowledged and that step's commit read, not
    when the drained process has exited (Ray's shutdown, 1-1.5 s); the exiting attempt keeps its
    devices booked until its cluster says it ended, and one whose exit hangs past
    placement.drain_timeout_s is stopped."""
    from orchestrator.controller.requests import migrate_job

    # Ten steps a tick on home, a save every five: two saves between two looks.
    home = FakeCluster("home", "owned", 2, exit_s=exit_s, step_s=0.1)
    fleet = FakeFleet(root, [home, FakeCluster("partner", "owned", 2)])
    controller = fleet.controller(root / "state")
    try:
        job_id = launch(controller, fleet, "trainer.max_steps=60", "placement.drain_timeout_s=30")
        fleet.run_until(controller, lambda: any(a.step >= 20 for a in home.live()))
        migrate_job(controller.state, job_id, "partner", fleet.clock())
        fleet.run_until(controller, lambda: len(controller.state.attempts(job_id)) == 2, max_s=30)
        drained = controller.state.attempts(job_id)[0]
        assert drained.state == AttemptState.DRAINED and drained.released_at is None
        (exiting,) = [a for a in live_attempts(fleet, job_id) if a.cluster.name == "home"]
        assert controller.state.devices_in_use("home") == 2  # booked while it exits
        fleet.run_until(
            controller, lambda: controller.state.attempts(job_id)[0].released_at, max_s=60
        )
        assert controller.state.devices_in_use("home") == 0
        # The catalog holds every commit the drained attempt left, not only the ones looked at.
        # Its last prune runs on the cleanup lane, in real time: looked at once it is done.
        fs, path = open_root(checkpoints_url(home.view(), job_id))
        fleet.run_until(controller, lambda: len(catalog.committed_steps(fs, path)) == 2, max_s=30)
        kept = sorted(c.step for c in controller.state.checkpoints(job_id) if c.cluster == "home")
        assert kept == sorted(catalog.committed_steps(fs, path)) and len(kept) == 2, kept
        assert exiting.status == ("STOPPED" if exit_s > 30 else "FAILED"), exiting.status
        run_checked(fleet, controller, job_id)
        first, second = controller.state.attempts(job_id)
        assert second.cluster == "partner" and second.first_step == first.last_step + 1
        assert second.steps_redone == 0
        steps = [r["step"] for r in every_step_once(fleet, controller, job_id)]
        assert steps == list(range(1, 61))
    finally:
        controller.close()
        fleet.close()
