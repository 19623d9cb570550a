"""Which checkpoint a moving job takes along, and what the copy records: local stores, no Ray."""

from __future__ import annotations

import os

from orchestrator.checkpoint import catalog, manifest, storage
from orchestrator.controller import migration
from orchestrator.controller.job_states import AttemptState
from orchestrator.controller.paths import checkpoints_url
from orchestrator.controller.state import ControllerState, JobRecord
from orchestrator.fleet.fleet import ClusterView

T0 = 1_795_000_000.0


def view(tmp_path, name: str) -> ClusterView:
    return ClusterView(
        name=name, kind="owned", local=True, address=None, dashboard_url=None, token=None,
        device_type="cpu", devices=2, device_resource="spillway_device",
        storage_root=str(tmp_path / name), cost_per_device_hour=0.0, lease_start=None,
        lease_end=None, running=True,
    )  # fmt: skip


def save(cluster: ClusterView, job_id: str, step: int, size: int = 4000) -> None:
    """Commit a checkpoint of random bytes through the real protocol."""
    fs, root = storage.open_root(checkpoints_url(cluster, job_id))
    tmp = catalog.tmp_dir(root, step)
    fs.makedirs(f"{tmp}/model", exist_ok=True)
    with fs.open(f"{tmp}/model/__0_0.distcp", "wb") as f:
        f.write(os.urandom(size))
    manifest.build_manifest(fs, tmp, meta={"step": step})
    catalog.commit(fs, tmp, catalog.step_dir(root, step))


def corrupt(cluster: ClusterView, job_id: str, step: int) -> None:
    fs, root = storage.open_root(checkpoints_url(cluster, job_id))
    path = f"{catalog.step_dir(root, step)}/model/__0_0.distcp"
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(path, bytes(data))


def test_sources_newest_first_the_targets_own_copy_first_on_a_tie(tmp_path):
    home, lease = view(tmp_path, "home"), view(tmp_path, "lease")
    save(home, "j", 10)
    save(home, "j", 20)
    save(lease, "j", 20)
    found = migration.checkpoint_sources("j", [home, lease], "lease", warn=print)
    assert [(s.cluster, s.step) for s in found] == [("lease", 20), ("home", 20), ("home", 10)]


def test_a_store_that_cannot_be_listed_is_skipped_with_a_warning(tmp_path):
    home = view(tmp_path, "home")
    save(home, "j", 10)
    gone = ClusterView(**{**view(tmp_path, "gone").__dict__, "storage_root": "nosuchproto://x"})
    warnings: list[str] = []
    found = migration.checkpoint_sources("j", [gone, home], "home", warn=warnings.append)
    assert [(s.cluster, s.step) for s in found] == [("home", 10)]
    assert len(warnings) == 1 and warnings[0].startswith("cannot list checkpoints on gone")


def test_a_corrupt_newest_checkpoint_is_passed_over_for_the_one_before(tmp_path):
    home, lease = view(tmp_path, "home"), view(tmp_path, "lease")
    save(home, "j", 10)
    save(home, "j", 20)
    corrupt(home, "j", 20)
    events: list[str] = []
    sources = migration.checkpoint_sources("j", [home, lease], "lease", warn=print)
    brought = migration.bring(sources, lease, "j", events.append)
    assert (brought.source.cluster, brought.source.step, brought.bytes) == ("home", 10, 4000)
    assert events[0].startswith("checkpoint step 20 on home does not verify")
    fs, root = storage.open_root(checkpoints_url(lease, "j"))
    assert catalog.committed_steps(fs, root) == [10]  # the corrupt one never reached the target


def test_the_copy_records_progress_the_catalog_and_last_of_all_its_completion(tmp_path):
    home, lease = view(tmp_path, "home"), view(tmp_path, "lease")
    save(home, "j", 30, size=50_000)
    with ControllerState.open(tmp_path / "controller.db") as state:
        state.add_job(JobRecord("j", "run", "{}", [2]), T0)
        state.add_attempt("j", "lease", 2, T0, state=AttemptState.PREPARING)
        sources = migration.checkpoint_sources("j", [home, lease], "lease", warn=print)
        migration.copy_for_attempt(state, "j", 1, sources, lease, None)
        attempt = state.attempts("j")[0]
        assert (attempt.copy_step, attempt.resumed_from_step) == (30, 30)
        assert attempt.copy_bytes_done == attempt.copy_bytes_total == 50_000
        assert attempt.copy_s is not None and attempt.state is AttemptState.PREPARING
        assert [(c.step, c.cluster, c.verified) for c in state.checkpoints("j")] == [
            (30, "lease", True)
        ]
        assert state.events("j")[-1].cause.startswith(
            "copied checkpoint step 30 from home to lease"
        )
        # Again, as a controller restarted mid-migration would: nothing is copied twice.
        sources = migration.checkpoint_sources("j", [home, lease], "lease", warn=print)
        assert sources[0].cluster == "lease"
        migration.copy_for_attempt(state, "j", 1, sources, lease, None)
        assert state.events("j")[-1].cause == "checkpoint step 30 is already on lease, verified"
        assert state.attempts("j")[0].copy_bytes_done == 50_000  # the first copy's bytes stay
        assert migration.committed_sizes(lease, "j") == {30: 50_000}


def test_nothing_anywhere_starts_from_step_0(tmp_path):
    events: list[str] = []
    brought = migration.bring([], view(tmp_path, "home"), "j", events.append)
    assert brought.source is None and brought.bytes == 0 and events == []


def test_a_checkpoint_pruned_after_it_was_listed_is_passed_over(tmp_path):
    home, lease = view(tmp_path, "home"), view(tmp_path, "lease")
    save(home, "j", 10)
    save(home, "j", 20)
    sources = migration.checkpoint_sources("j", [home, lease], "lease", warn=print)
    fs, root = storage.open_root(checkpoints_url(home, "j"))
    storage.remove_tree(fs, catalog.step_dir(root, 20))
    events: list[str] = []
    brought = migration.bring(sources, lease, "j", events.append)
    assert brought.source.step == 10
    assert events[0].startswith("checkpoint step 20 on home is gone")
