"""A SIGTERM to one rank drains every rank: a committed checkpoint of that step, an
acknowledgement, the drained exit status, and a resume that continues exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.rundir import RunDir
from recipes.common.drain import DRAINED_EXIT
from tests.integration.recipe_runs import BASE, REPO, ok, torchrun

pytestmark = pytest.mark.slow

LONG = ("trainer.max_steps=400", "checkpoint.every_steps=1000")


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_steps(run_dir: Path, n: int, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    run_files = RunDir(str(run_dir))
    while time.monotonic() < deadline:
        if len(run_files.read_metrics()) >= n:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} steps after {timeout_s}s")


def rank_pid(launcher_pid: int, rank: int) -> int:
    """The PID of a torchrun worker with RANK=rank among launcher_pid's descendants."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
                )
            except OSError:
                continue

    def descends(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == launcher_pid:
                return True
        return False

    for pid in parents:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            descends(pid)
            and f"RANK={rank}".encode() in environ
            and b"LOCAL_RANK=" + str(rank).encode() in environ
        ):
            return pid
    raise AssertionError(f"no rank {rank} under {launcher_pid}")


def drained_step(run_dir: Path) -> int:
    run_files = RunDir(str(run_dir))
    step = run_files.drain_ack()["step"]
    assert (run_dir / "checkpoints" / f"step-{step:09d}" / "MANIFEST.json").is_file()
    assert run_files.read_metrics()[-1]["step"] == step, "trained past the drain"
    return step


def test_sigterm_to_a_lone_process_exits_with_the_drained_status(tmp_path):
    run_dir = tmp_path / "run"
    proc = start([sys.executable, "-m", "recipes.gpt.train", *BASE, *LONG, f"run_dir={run_dir}"])
    wait_for_steps(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == DRAINED_EXIT, err[-3000:]
    assert f"drained after step {drained_step(run_dir)} (SIGTERM)" in err


def test_sigterm_to_one_rank_drains_all_and_resumes_exactly(tmp_path):
    reference = ok(torchrun(2, tmp_path / "ref", *BASE, "trainer.max_steps=30"))
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "recipes.gpt.train", *BASE, "trainer.max_steps=30", "checkpoint.every_steps=1000",
        f"run_dir={run_dir}",
    ]  # fmt: skip
    proc = start(cmd)
    wait_for_steps(run_dir, 4, proc)
    os.kill(rank_pid(proc.pid, 1), signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    step = drained_step(run_dir)
    assert step < 30, "the drain came too late to test anything"
    assert f"drained after step {step} (another rank was asked)" in err  # rank 0's view

    resumed = ok(torchrun(2, run_dir, *BASE, "trainer.max_steps=30", "checkpoint.every_steps=1000"))
    assert f"resumed from step {step}" in resumed.stderr
    assert resumed.losses == reference.losses  # zero steps lost, bit for bit
