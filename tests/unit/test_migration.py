"""Which checkpoint a moving job takes along, and what the copy records: local stores, no Ray."""

from __future__ import annotations

import os
import re

from orchestrator.checkpoint import catalog, manifest, storage
from orchestrator.controller import migration
from orchestrator.controller.job_states import AttemptState
from orchestrator.controller.observe import committed
from orchestrator.controller.paths import checkpoints_url
from orchestrator.controller.state import CheckpointRecord, ControllerState, JobRecord
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


def recorded_sources(job_id: str, views: list[ClusterView], target: str) -> list:
    """What the catalog would hold had the controller recorded every commit in these stores
    (observe.committed reads each manifest's digest), as the job's line of sources."""
    records = [
        CheckpointRecord(
            job_id, step, v.name, checkpoints_url(v, job_id), c.bytes, False, T0, c.digest, c.epoch
        )  # fmt: skip
        for v in views
        for step, c in committed(v, job_id).items()
    ]
    return migration.line_sources(records, target, {v.name: v for v in views})


def test_sources_newest_first_the_targets_own_copy_first_on_a_tie(tmp_path):
    home, lease = view(tmp_path, "home"), view(tmp_path, "lease")
    save(home, "j", 10)
    save(home, "j", 20)
    save(lease, "j", 20)
    found = recorded_sources("j", [home, lease], "lease")
    assert [(s.cluster, s.step) for s in found] == [("lease", 20), ("home", 20), ("home", 10)]
    assert all(re.fullmatch(r"blake3:[0-9a-f]{64}", s.manifest_digest) for s in found)


def test_a_manifest_rewritten_after_its_commit_was_recorded_is_refused(tmp_path):
    home, lease = view(tmp_path, "home"), view(tmp_path, "lease")
    save(home, "j", 10)
    save(home, "j", 20)
    sources = recorded_sources("j", [home, lease], "lease")
    # The partner rewrites step 20 whole, manifest included: it verifies, but is not the one
    # recorded at its commit.
    fs, root = storage.open_root(checkpoints_url(home, "j"))
    storage.remove_tree(fs, catalog.step_dir(root, 20))
    save(home, "j", 20)
    events: list[str] = []
    brought = migration.bring(sources, lease, "j", events.append)
    assert (brought.source.cluster, brought.source.step) == ("home", 10)
    assert "does not match the digest recorded" in events[0], events


def test_a_corrupt_newest_checkpoint_is_passed_over_for_the_one_before(tmp_path):
    home, lease = view(tmp_path, "home"), view(tmp_path, "lease")
    save(home, "j", 10)
    save(home, "j", 20)
    corrupt(home, "j", 20)
    events: list[str] = []
    sources = recorded_sources("j", [home, lease], "lease")
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
        sources = recorded_sources("j", [home, lease], "lease")
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
        sources = recorded_sources("j", [home, lease], "lease")
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
    sources = recorded_sources("j", [home, lease], "lease")
    fs, root = storage.open_root(checkpoints_url(home, "j"))
    storage.remove_tree(fs, catalog.step_dir(root, 20))
    events: list[str] = []
    brought = migration.bring(sources, lease, "j", events.append)
    assert brought.source.step == 10
    assert events[0].startswith("checkpoint step 20 on home is gone")
