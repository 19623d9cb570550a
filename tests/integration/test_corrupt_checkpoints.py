"""A checkpoint that does not verify is never loaded: training resumes from the one before."""

from __future__ import annotations

import shutil

import pytest

from tests.integration.recipe_runs import ok, torchrun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return ok(torchrun(2, tmp_path_factory.mktemp("ref") / "run"))


@pytest.fixture(scope="module")
def stopped_at_nine(tmp_path_factory):
    """Committed checkpoints at steps 3, 6 and 9."""
    run = ok(torchrun(2, tmp_path_factory.mktemp("stop9") / "run", "trainer.stop_at_step=9"))
    assert sorted(p.name for p in run.checkpoints.iterdir()) == [
        "step-000000003",
        "step-000000006",
        "step-000000009",
    ]
    return run


def damaged_copy(run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(run.run_dir, run_dir)
    return run_dir, run_dir / "checkpoints" / "step-000000009"


def test_truncated_shard_is_skipped(reference, stopped_at_nine, tmp_path):
    run_dir, latest = damaged_copy(stopped_at_nine, tmp_path)
    shard = latest / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    resumed = ok(torchrun(2, run_dir))
    assert "skipping checkpoint step-000000009: __1_0.distcp has" in resumed.stderr
    assert "resumed from step 6" in resumed.stderr
    assert resumed.losses == reference.losses


def test_flipped_byte_is_skipped(reference, stopped_at_nine, tmp_path):
    run_dir, latest = damaged_copy(stopped_at_nine, tmp_path)
    shard = latest / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    resumed = ok(torchrun(1, run_dir))
    assert "skipping checkpoint step-000000009: __0_0.distcp" in resumed.stderr
    assert "resumed from step 6" in resumed.stderr


def test_checkpoint_without_manifest_is_never_loaded(reference, stopped_at_nine, tmp_path):
    run_dir, latest = damaged_copy(stopped_at_nine, tmp_path)
    (latest / "MANIFEST.json").unlink()
    # A save that died before its rename: complete-looking files, no manifest, .tmp name.
    shutil.copytree(
        run_dir / "checkpoints" / "step-000000006", run_dir / "checkpoints" / "step-000000010.tmp"
    )
    (run_dir / "checkpoints" / "step-000000010.tmp" / "MANIFEST.json").unlink()

    resumed = ok(torchrun(2, run_dir))
    assert "skipping checkpoint step-000000009: MANIFEST.json" in resumed.stderr
    assert "removed step-000000010.tmp" in resumed.stderr
    assert "resumed from step 6" in resumed.stderr
    assert resumed.losses == reference.losses
    assert not (run_dir / "checkpoints" / "step-000000010.tmp").exists()


def test_checkpoint_of_another_model_shape_is_refused(stopped_at_nine, tmp_path):
    run_dir, _ = damaged_copy(stopped_at_nine, tmp_path)
    refused = torchrun(1, run_dir, "model.n_kv_heads=4")
    assert refused.returncode != 0
    assert "was saved from another model shape" in refused.stderr
    assert sorted(refused.losses) == list(range(1, 10)), "nothing may be trained or logged"
