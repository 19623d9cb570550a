"""What the fault tests share: finding a cluster's processes, reading a job's losses, and the
uninterrupted runs they are compared with."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from orchestrator.fleet.local import LocalCluster
from orchestrator.fleet.processes import session_pids
from orchestrator.tracking.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]

# One config for every fault case, so one uninterrupted run per world size serves them all.
FAULT = ["data=synthetic", "data.seq_len=32", "checkpoint.every_steps=10", "trainer.max_steps=200"]


def cluster(home: Path, name: str) -> LocalCluster:
    return LocalCluster.load(home / "fleet" / "local" / f"{name}.json")


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def rank_pids(home: Path, name: str) -> list[int]:
    """The rank actors' processes on a local cluster (Ray titles them ray::RankActor...)."""
    pids = session_pids(cluster(home, name).session_id)
    return [p for p in pids if any("RankActor" in a for a in _cmdline(p))]


def driver_pids(job_id: str) -> list[int]:
    """The Python processes of a job's attempt drivers. Ray starts each driver in a session of
    its own, so they are found by their command line and the attempt spec in their environment."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = _cmdline(int(entry.name))
        if "orchestrator.runtime.driver" not in argv or "python" not in argv[0]:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if f'"job_id": "{job_id}"'.encode() in environ:
            found.append(int(entry.name))
    return found


def metrics(spillway, job_id: str) -> list[dict]:
    done = spillway("metrics", job_id, "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(x) for x in done.stdout.splitlines()]


def last_step(spillway, job_id: str) -> int:
    lines = metrics(spillway, job_id)
    return lines[-1]["step"] if lines else 0


def uninterrupted(home: Path, world: int, overrides: list[str]) -> dict[int, float]:
    """Losses of the same run, never interrupted, under plain torchrun on `world` ranks."""
    key = hashlib.sha256(json.dumps(overrides).encode()).hexdigest()[:12]
    run_dir = home / "reference" / f"w{world}-{key}"
    if not (run_dir / "metrics.jsonl").exists():
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={world}", "-m", "recipes.gpt.train", *overrides,
            f"resources.devices={world}", f"run_dir={run_dir}",
        ]  # fmt: skip
        env = dict(os.environ, SPILLWAY_HOME=str(home), TMPDIR=str(home / "tmp"))
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}


def assert_losses_match(lines: list[dict], reference: dict[int, float], rel: float) -> None:
    """Every step any attempt ran (redone ones too) has the uninterrupted run's loss."""
    assert sorted({r["step"] for r in lines}) == sorted(reference), "steps missing or extra"
    worst = max(abs(r["loss"] - reference[r["step"]]) / abs(reference[r["step"]]) for r in lines)
    print(f"largest relative loss difference against the uninterrupted run: {worst:.2e}")
    assert worst <= rel, f"largest relative loss difference {worst:.2e} > {rel:.0e}"
