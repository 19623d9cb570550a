"""A zombie attempt stops itself at its next commit once a newer epoch holds the fence, and the
newer attempt resumes from exactly the step it is given, not from the zombie's newer one.

Both attempts share one checkpoint folder, as two attempts on one cluster do."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator import exit_codes
from orchestrator.checkpoint import catalog, storage
from orchestrator.checkpoint.fence import write_fence
from orchestrator.rundir import RunDir
from tests.integration.recipe_runs import BASE, REPO, ok, torchrun

pytestmark = pytest.mark.slow

# A commit every 10 steps (about half a second here): time enough to move the fence between two.
LONG = ("trainer.max_steps=400", "checkpoint.every_steps=10", "checkpoint.keep=2")


def attempt_args(storage_dir: Path, fence: Path, epoch: int, *more: str) -> list[str]:
    return [
        *BASE,
        *LONG,
        f"checkpoint.storage={storage_dir}",
        f"checkpoint.fence_url={fence}",
        f"checkpoint.epoch={epoch}",
        *more,
    ]


def manifests(storage_dir: Path) -> dict[int, tuple[str, int | None]]:
    fs, root = storage.open_root(str(storage_dir))
    return catalog.committed_manifests(fs, root)


def wait_for_save(run_dir: Path, step: int, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    run_files = RunDir(str(run_dir))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        saved = run_files.last_save()
        if saved is not None and saved["step"] >= step:
            assert saved["step"] == step, f"already saved step {saved['step']}: polled too slowly"
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    raise AssertionError(f"no save of step {step} after {timeout_s}s")


def test_a_zombie_is_fenced_and_the_newer_line_resumes_from_the_step_it_is_given(tmp_path):
    storage_dir, fence = tmp_path / "checkpoints", tmp_path / "fence.json"
    write_fence(str(fence), {}, epoch=1, attempt=1)
    zombie_dir = tmp_path / "attempt-1"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "recipes.gpt.train", *attempt_args(storage_dir, fence, 1), f"run_dir={zombie_dir}",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for_save(zombie_dir, 20, proc)
        # The controller declared the attempt lost and started epoch 2 elsewhere.
        write_fence(str(fence), {}, epoch=2, attempt=2)
        before = manifests(storage_dir)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert sorted(before) == [10, 20] and {e for _, e in before.values()} == {1}
    assert "stopped after step 30, committing nothing: fenced: this attempt has epoch 1" in err
    assert f"exitcode  : {exit_codes.FENCED}" in err  # torchrun's summary of the ranks' exits
    zombie = RunDir(str(zombie_dir))
    assert zombie.read_metrics()[-1]["step"] == 30, "trained past the refused commit"
    assert manifests(storage_dir) == before  # nothing committed, nothing pruned, nothing rewritten
    # Refused at the save's own fence check: not a byte of step 30 was written.
    assert sorted(p.name for p in storage_dir.iterdir()) == [
        "step-000000010",
        "step-000000020",
    ]
    assert zombie.last_save()["step"] == 20 and zombie.drain_ack() is None

    # The newer attempt was told step 10; the zombie's step 20 beside it is never loaded.
    newer = ok(
        torchrun(
            2,
            tmp_path / "attempt-2",
            *attempt_args(storage_dir, fence, 2, "checkpoint.resume_step=10"),
            "trainer.stop_at_step=20",
        )
    )
    assert "resumed from step 10" in newer.stderr
    assert "removing checkpoint step 20 of epoch 1: a superseded line (this is 2)" in newer.stderr
    zombie_losses = {r["step"]: r["loss"] for r in zombie.read_metrics()}
    assert sorted(newer.losses) == list(range(11, 21))
    assert newer.losses == {s: zombie_losses[s] for s in range(11, 21)}  # bit for bit
    after = manifests(storage_dir)
    assert {s: e for s, (_, e) in after.items()} == {10: 1, 20: 2}
    assert after[20][0] != before[20][0]


def test_a_resume_step_that_is_not_committed_fails_naming_it(tmp_path):
    storage_dir = tmp_path / "checkpoints"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "recipes.gpt.train",
            *BASE,
            "checkpoint.resume_step=15",
            f"checkpoint.storage={storage_dir}",
            f"run_dir={tmp_path / 'run'}",
        ],  # fmt: skip
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    url = f"file://{storage_dir}"
    assert f"CheckpointNotFound: checkpoint step 15 is not committed in {url}" in run.stderr
    assert RunDir(str(tmp_path / "run")).read_metrics() == [], "nothing may be trained"
