"""The fake cluster itself (it trains, commits, drains, fences and fails as scripted; calls are
recorded), and the real Controller driven through it: a job to SUCCEEDED, a lease-end drain that
continues on another cluster from its checkpoint, a dead driver recovered from, a restart."""

from __future__ import annotations

import dataclasses
import functools
import tempfile
import threading
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from orchestrator import exit_codes
from orchestrator.backends.base import (
    FAILED,
    PENDING,
    RUNNING,
    STOPPED,
    SUCCEEDED,
    BackendError,
    submission_id,
)
from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.fence import write_fence
from orchestrator.checkpoint.manifest import MANIFEST_NAME, verify
from orchestrator.checkpoint.storage import open_root
from orchestrator.config import compose_run
from orchestrator.controller.job_states import AttemptState, JobState
from orchestrator.controller.paths import attempt_dir, checkpoints_url, job_root, run_files
from orchestrator.controller.requests import submit_job
from orchestrator.fleet.leases import resolve_time
from orchestrator.rundir import RunDir
from orchestrator.runtime.spec import AttemptSpec, attempt_run_config
from tests.fake_cluster import FakeCluster, FakeFleet, loss_at

BASE = ("data=synthetic", "trainer.max_steps=12", "checkpoint.every_steps=5", "checkpoint.keep=2")


@functools.lru_cache(maxsize=16)
def composed(overrides: tuple[str, ...]) -> DictConfig:
    return compose_run(list(overrides))


def stored(*overrides: str) -> dict:
    """A run config as the controller stores it at launch."""
    return OmegaConf.to_container(composed(BASE + overrides))


@pytest.fixture
def root(spillway_home: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix="fake-fleet-", dir=spillway_home))


@pytest.fixture
def fleet(root: Path):
    made = FakeFleet(root, [FakeCluster("home", "owned", 2), FakeCluster("partner", "owned", 2)])
    yield made
    made.close()


def hand_over(fleet: FakeFleet, cluster: str, job_id: str, number: int, cfg: dict, **pins):
    """What the controller does before a submit: the attempt's run config in its run dir."""
    view = fleet[cluster].view()
    run_dir = attempt_dir(view, job_id, number)
    storage = checkpoints_url(view, job_id)
    RunDir(run_dir).write_run_config(attempt_run_config(cfg, 2, run_dir, storage, **pins))
    epoch = pins.get("epoch") or 0
    return AttemptSpec(job_id, number, 2, view.device_resource, run_dir, epoch=epoch)


def submitted(fleet: FakeFleet, cluster: str, job_id: str, number: int, cfg: dict, **pins):
    """The FakeAttempt of a submit just made."""
    sid = fleet[cluster].submit(hand_over(fleet, cluster, job_id, number, cfg, **pins))
    return fleet[cluster].attempts[sid]


def steps_in(fleet: FakeFleet, cluster: str, job_id: str) -> list[int]:
    fs, path = open_root(checkpoints_url(fleet[cluster].view(), job_id))
    return catalog.committed_steps(fs, path)


# ---- the fake by itself ------------------------------------------------------------------------


def test_an_attempt_trains_commits_prunes_and_succeeds(fleet: FakeFleet) -> None:
    home = fleet["home"]
    spec = hand_over(fleet, "home", "j1", 1, stored())
    sid = home.submit(spec)
    assert sid == submission_id("j1", 1) and home.info(sid).status == PENDING
    fleet.advance(1.0)
    attempt = home.attempts[sid]
    assert home.info(sid).status == RUNNING and attempt.step == 0
    assert fleet.probe(home.view()).devices_used == 2.0
    fleet.advance(5.0)
    records = RunDir(spec.run_dir).read_metrics()
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in records] == [loss_at(s) for s in range(1, 6)]
    assert {r["world_size"] for r in records} == {2}
    assert [r["time"] - records[0]["time"] for r in records] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert attempt.committed == [5] and RunDir(spec.run_dir).last_save()["step"] == 5

    fleet.advance(20.0)
    info = home.info(sid)
    assert (info.status, info.exit_code, info.message) == (
        SUCCEEDED,
        0,
        "Job finished successfully.",
    )
    assert attempt.committed == [5, 10, 12]
    assert steps_in(fleet, "home", "j1") == [12, 10]  # keep=2 pruned step 5
    fs, path = open_root(checkpoints_url(home.view(), "j1"))
    assert verify(fs, catalog.step_dir(path, 12), check_hashes=True)["meta"]["step"] == 12
    assert [r["step"] for r in RunDir(spec.run_dir).read_metrics()] == list(range(1, 13))
    assert fleet.probe(home.view()).devices_used == 0.0
    assert "committed checkpoint step 10" in home.logs(sid)

    with pytest.raises(BackendError, match="already exists") as again:
        home.submit(spec)
    assert not again.value.refused and not again.value.timed_out
    assert home.count("submit", sid) == 2 and home.list() == [sid]
    with pytest.raises(BackendError, match="does not exist"):
        home.info("nobody-a1")


def test_an_attempt_resumes_from_the_step_its_config_names(fleet: FakeFleet) -> None:
    cfg = stored("trainer.max_steps=40", "checkpoint.keep=3")
    first = submitted(fleet, "home", "j2", 1, cfg)
    fleet.advance(13.0)  # steps 1..12: committed 5 and 10
    first.die()
    assert (first.status, first.exit_code, first.committed) == (FAILED, -9, [5, 10])

    def started(number: int, **pins):
        attempt = submitted(fleet, "home", "j2", number, cfg, **pins)
        fleet.advance(2.0)  # starts, then trains one step
        attempt.die(exit_codes.RANK_LOST)
        return attempt, RunDir(attempt.spec.run_dir).read_metrics()

    newest, lines = started(2)  # resume_step null: the newest committed
    assert newest.resumed_from == 10 and [r["step"] for r in lines] == [11]
    assert newest.exit_code == exit_codes.RANK_LOST
    older, lines = started(3, resume_step=5)
    assert older.resumed_from == 5 and [r["step"] for r in lines] == [6]
    scratch, lines = started(4, resume_step=0)
    assert scratch.resumed_from is None and [r["step"] for r in lines] == [1]
    missing, _ = started(5, resume_step=7)
    assert (missing.status, missing.exit_code) == (FAILED, exit_codes.INFRASTRUCTURE)
    assert "step 7 is not committed" in missing.message


def test_a_drain_request_commits_acknowledges_and_exits_drained(fleet: FakeFleet) -> None:
    home = fleet["home"]
    spec = hand_over(fleet, "home", "j3", 1, stored())
    attempt = home.attempts[home.submit(spec)]
    fleet.advance(4.0)  # steps 1..3
    RunDir(spec.run_dir).request_drain("lease on home ends")
    fleet.advance(3.0)
    assert (attempt.status, attempt.exit_code, attempt.step) == (FAILED, exit_codes.DRAINED, 4)
    assert "exit code 75" in home.info(attempt.submission_id).message
    assert attempt.committed == [4] and steps_in(fleet, "home", "j3") == [4]
    ack = RunDir(spec.run_dir).drain_ack()
    assert (ack["step"], ack["reason"]) == (4, "lease on home ends")


def test_a_newer_epoch_in_the_fence_stops_the_attempt_before_its_commit(fleet: FakeFleet) -> None:
    home = fleet["home"]
    fence = f"{job_root(home.view(), 'j4')}/FENCE"
    write_fence(fence, None, epoch=1, attempt=1)
    spec = hand_over(fleet, "home", "j4", 1, stored(), epoch=1, fence_url=fence)
    attempt = home.attempts[home.submit(spec)]
    fleet.advance(6.0)  # its own epoch in the fence: step 5 commits, under that epoch
    assert attempt.committed == [5]
    fs, path = open_root(checkpoints_url(home.view(), "j4"))
    assert verify(fs, catalog.step_dir(path, 5))["epoch"] == 1
    write_fence(fence, None, epoch=2, attempt=2)
    fleet.advance(10.0)
    assert (attempt.status, attempt.exit_code) == (FAILED, exit_codes.FENCED)
    assert attempt.step == 10 and attempt.committed == [5]
    assert steps_in(fleet, "home", "j4") == [5]  # nothing of the stale attempt after the fence
    assert RunDir(spec.run_dir).drain_ack() is None


def test_scripted_failures(fleet: FakeFleet) -> None:
    home = fleet["home"]
    home.fail_at(3, exit_codes.USER_ERROR, "ValueError: the user's model is wrong")
    spec = hand_over(fleet, "home", "j5", 1, stored())
    failed = home.attempts[home.submit(spec)]
    fleet.advance(10.0)
    assert (failed.status, failed.exit_code, failed.step) == (FAILED, 1, 2)
    assert "the user's model is wrong" in home.info(failed.submission_id).message
    assert [r["step"] for r in RunDir(spec.run_dir).read_metrics()] == [1, 2]

    home.no_capacity()
    starved = submitted(fleet, "home", "j5", 2, stored())
    fleet.advance(2.0)
    assert (starved.status, starved.exit_code) == (FAILED, exit_codes.NO_CAPACITY)
    assert starved.committed == [] and home.devices_used() == 0

    # Two gangs of 2 on 2 devices: the second waits, and runs once the first has died.
    first = submitted(fleet, "home", "j6", 1, stored())
    second = submitted(fleet, "home", "j7", 1, stored())
    fleet.advance(3.0)
    assert first.reserved and not second.reserved and second.status == RUNNING
    first.die()
    fleet.advance(3.0)
    assert second.reserved and second.step >= 1 and home.devices_used() == 2
    home.die(exit_codes.RANK_LOST)
    assert (second.status, second.exit_code) == (FAILED, exit_codes.RANK_LOST)


def test_a_gang_that_never_fits_ends_with_no_capacity(fleet: FakeFleet) -> None:
    home = fleet["home"]
    blocker = submitted(fleet, "home", "j8", 1, stored())
    spec = hand_over(fleet, "home", "j9", 1, stored())
    waiting = home.attempts[home.submit(dataclasses.replace(spec, reserve_timeout_s=5.0))]
    fleet.advance(10.0)
    assert blocker.status == RUNNING
    assert (waiting.status, waiting.exit_code) == (FAILED, exit_codes.NO_CAPACITY)


def test_a_refusing_cluster_refuses_everything_and_its_attempts_stand_still(fleet):
    home = fleet["home"]
    attempt = submitted(fleet, "home", "j10", 1, stored())
    fleet.advance(3.0)  # steps 1, 2
    home.refuse()
    for call in (lambda: home.info(attempt.submission_id), home.list, lambda: home.stop("x")):
        with pytest.raises(BackendError, match="Connection refused") as refused:
            call()
        assert refused.value.refused and not refused.value.timed_out
    probe = fleet.probe(home.view())
    assert not probe.reachable and "Connection refused" in probe.error
    fleet.advance(30.0)
    assert attempt.step == 2 and attempt.live
    home.heal()
    fleet.advance(2.0)
    assert attempt.step == 4 and fleet.probe(home.view()).reachable
    times = [r["time"] for r in RunDir(attempt.spec.run_dir).read_metrics()]
    assert times[2] - times[1] == 31.0  # the 30 s it stood still, then its next step
    assert home.count("info", attempt.submission_id) == 1 and home.count("probe") == 2


def test_a_hung_cluster_times_out_and_a_partitioned_one_trains_on(root: Path) -> None:
    fleet = FakeFleet(root, [FakeCluster("home", "owned", 2, hang_s=0.01)])
    home = fleet["home"]
    try:
        attempt = submitted(fleet, "home", "j11", 1, stored())
        fleet.advance(3.0)
        home.hang()
        with pytest.raises(BackendError, match="timed out") as hung:
            home.info(attempt.submission_id)
        assert hung.value.timed_out and not hung.value.refused
        probe = fleet.probe(home.view())
        assert not probe.reachable and "timed out" in probe.error
        fleet.advance(5.0)
        assert attempt.step == 2

        home.partition()  # the zombie: unreachable, yet it trains and commits
        with pytest.raises(BackendError) as cut:
            home.stop(attempt.submission_id)
        assert cut.value.timed_out and not fleet.probe(home.view()).reachable
        fleet.advance(8.0)
        assert attempt.step == 10 and attempt.committed == [5, 10]
        assert steps_in(fleet, "home", "j11") == [10, 5]
        home.heal()
        assert home.stop(attempt.submission_id) is True
        assert home.info(attempt.submission_id).status == STOPPED
        assert home.stop(attempt.submission_id) is False
        assert home.count("stop", attempt.submission_id) == 3
    finally:
        fleet.close()


def test_a_submit_whose_answer_is_lost_was_accepted(root: Path) -> None:
    fleet = FakeFleet(root, [FakeCluster("home", "owned", 2, hang_s=0.01)])
    home = fleet["home"]
    try:
        spec = hand_over(fleet, "home", "j12", 1, stored())
        home.accept_then_time_out()
        with pytest.raises(BackendError) as lost:
            home.submit(spec)
        assert lost.value.timed_out
        sid = submission_id("j12", 1)
        assert home.exists(sid)
        fleet.advance(3.0)
        assert home.info(sid).status == RUNNING and home.attempts[sid].step == 2
        with pytest.raises(BackendError, match="already exists"):
            home.submit(spec)
        assert home.count("submit", sid) == 2 and len(home.attempts) == 1
    finally:
        fleet.close()


def test_follow_logs_streams_until_the_attempt_ends(fleet: FakeFleet) -> None:
    home = fleet["home"]
    sid = home.submit(hand_over(fleet, "home", "j13", 1, stored()))

    def time_passes() -> None:
        for _ in range(20):
            fleet.advance(1.0)

    clock = threading.Thread(target=time_passes)
    clock.start()
    lines = list(home.follow_logs(sid))
    clock.join()
    assert home.info(sid).status == SUCCEEDED
    assert lines == home.logs(sid).splitlines()
    assert "spillway: committed checkpoint step 12" in lines


def test_the_fleet_gives_the_controller_views_and_a_matching_config(root: Path) -> None:
    fleet = FakeFleet(
        root,
        [
            FakeCluster("home", "owned", 2),
            FakeCluster("partner", "leased", 4, cost_per_device_hour=2.5),
        ],
        lost_after_s=7.0,
    )
    partner = fleet["partner"]
    partner.lease_start, partner.lease_end = fleet.clock() - 10, fleet.clock() + 600.5
    views = {v.name: v for v in fleet.fleet()}
    assert Path(views["home"].storage_root).is_dir() and views["partner"].devices == 4
    cfg = fleet.fleet_cfg
    assert list(cfg.clusters) == ["home", "partner"] and cfg.lost_after_s == 7.0
    leased = cfg.clusters.partner
    assert (leased.kind, leased.local, leased.storage_root) == (
        "leased",
        False,
        views["partner"].storage_root,
    )
    assert resolve_time(leased.lease_end, 0.0) == pytest.approx(partner.lease_end)
    assert fleet.backend_for(views["partner"]) is partner
    fleet.remove("partner")
    assert [v.name for v in fleet.fleet()] == ["home"] and list(fleet.fleet_cfg.clusters) == [
        "home"
    ]


# ---- the Controller on the fake ------------------------------------------------------------------


def launch(controller, fleet: FakeFleet, *overrides: str) -> str:
    cfg = composed(BASE + overrides)
    return submit_job(controller.state, cfg, list(overrides), fleet.clock())


def state_of(controller, job_id: str) -> JobState:
    return controller.state.get_job(job_id).state


def finished(controller, job_id: str):
    return lambda: state_of(controller, job_id) in (JobState.SUCCEEDED, JobState.FAILED)


def every_step_once(fleet: FakeFleet, controller, job_id: str) -> list[dict]:
    """The metrics of every attempt, in order; each step's loss is the uninterrupted one's."""
    lines = []
    for a in controller.state.attempts(job_id):
        lines += run_files(fleet[a.cluster].view(), job_id, a.attempt).read_metrics()
    assert all(r["loss"] == loss_at(r["step"]) for r in lines)
    return lines


def test_the_controller_runs_a_job_to_success_on_one_cluster(fleet: FakeFleet, root) -> None:
    controller = fleet.controller(root / "state")
    try:
        job_id = launch(controller, fleet, "trainer.max_steps=20")
        fleet.run_until(controller, finished(controller, job_id), max_s=60)
        assert state_of(controller, job_id) == JobState.SUCCEEDED
        (attempt,) = controller.state.attempts(job_id)
        assert (attempt.cluster, attempt.state, attempt.last_step) == (
            "home",
            AttemptState.SUCCEEDED,
            20,
        )
        assert fleet["home"].count("submit", attempt.ray_job_id) == 1
        assert fleet["partner"].attempts == {}
        assert [r["step"] for r in every_step_once(fleet, controller, job_id)] == list(range(1, 21))
    finally:
        controller.close()


def test_a_lease_end_drains_the_job_and_it_continues_at_home(root: Path) -> None:
    fleet = FakeFleet(root, [FakeCluster("home", "owned", 2), FakeCluster("partner", "leased", 2)])
    partner = fleet["partner"]
    partner.lease_start, partner.lease_end = fleet.clock() - 1, fleet.clock() + 60
    controller = fleet.controller(root / "state")
    try:
        job_id = launch(
            controller, fleet, "trainer.max_steps=80", "checkpoint.every_steps=10",
            "checkpoint.keep=10",  # the copied step stays at home to be looked at
            "placement.clusters=[partner,home]", "placement.min_lease_left_s=30",
            "placement.lease_drain_margin_s=20",
        )  # fmt: skip
        fleet.run_until(controller, finished(controller, job_id), max_s=200)
        assert state_of(controller, job_id) == JobState.SUCCEEDED
        away, back = controller.state.attempts(job_id)
        assert (away.cluster, away.state) == ("partner", AttemptState.DRAINED)
        assert (back.cluster, back.state) == ("home", AttemptState.SUCCEEDED)
        ack = run_files(partner.view(), job_id, away.attempt).drain_ack()
        drained_at = ack["step"]
        assert away.last_step == drained_at and back.resumed_from_step == drained_at
        (resumed,) = fleet["home"].attempts.values()
        assert resumed.resumed_from == drained_at
        # A real, verified copy: the same manifest on both stores, every file checked at home.
        manifests = []
        for name in ("partner", "home"):
            fs, path = open_root(checkpoints_url(fleet[name].view(), job_id))
            step_path = catalog.step_dir(path, drained_at)
            verify(fs, step_path, check_hashes=True)
            manifests.append(fs.cat_file(f"{step_path}/{MANIFEST_NAME}"))
        assert manifests[0] == manifests[1]
        lines = every_step_once(fleet, controller, job_id)
        assert [r["step"] for r in lines] == list(range(1, 81))
        assert partner.count("submit", away.ray_job_id) == 1
    finally:
        controller.close()
        fleet.close()


def test_the_controller_recovers_from_a_dead_driver(fleet: FakeFleet, root: Path) -> None:
    home = fleet["home"]
    controller = fleet.controller(root / "state")
    try:
        job_id = launch(controller, fleet, "trainer.max_steps=30", "checkpoint.every_steps=10")
        fleet.run_until(controller, lambda: any(a.step >= 12 for a in home.attempts.values()))
        home.die()
        fleet.run_until(controller, finished(controller, job_id), max_s=120)
        assert state_of(controller, job_id) == JobState.SUCCEEDED
        dead, again = controller.state.attempts(job_id)
        assert (dead.cluster, dead.state) == ("home", AttemptState.FAILED)
        assert "exit code -9" in dead.exit_reason
        # failover: the next cluster, from the checkpoint committed before the death
        assert (again.cluster, again.state, again.resumed_from_step) == (
            "partner",
            AttemptState.SUCCEEDED,
            10,
        )
        assert controller.state.get_job(job_id).restarts == 1
        steps = [r["step"] for r in every_step_once(fleet, controller, job_id)]
        assert steps == list(range(1, 13)) + list(range(11, 31))  # steps 11, 12 redone
    finally:
        controller.close()


def test_a_restarted_controller_carries_on_without_submitting_twice(fleet, root: Path) -> None:
    controller = fleet.controller(root / "state")
    job_id = launch(controller, fleet, "trainer.max_steps=15")
    fleet.run_until(controller, lambda: state_of(controller, job_id) == JobState.RUNNING)
    controller = fleet.restart(controller)
    try:
        fleet.run_until(controller, finished(controller, job_id), max_s=60)
        assert state_of(controller, job_id) == JobState.SUCCEEDED
        (attempt,) = controller.state.attempts(job_id)
        assert fleet["home"].count("submit", attempt.ray_job_id) == 1
    finally:
        controller.close()
