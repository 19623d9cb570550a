"""What the fault tests share: finding a cluster's processes, reading a job's losses, and the
uninterrupted runs they are compared with."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from orchestrator.checkpoint.storage import open_root
from orchestrator.fleet.fleet import ClusterView
from orchestrator.fleet.local import LocalCluster
from orchestrator.fleet.processes import session_pids
from orchestrator.fleet.s3server import credentials_path
from orchestrator.rundir import RunDir

REPO = Path(__file__).resolve().parents[2]

# One config for every fault case, so one uninterrupted run per world size serves them all.
# Metrics reach the run files every 0.25 s, so a test polling them acts near the step it means.
FAULT = [
    "data=synthetic",
    "data.seq_len=32",
    "checkpoint.every_steps=10",
    "trainer.max_steps=100",
    "logger.metrics_flush_s=0.25",
]


def cluster(home: Path, name: str) -> LocalCluster:
    return LocalCluster.load(home / "fleet" / "local" / f"{name}.json")


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def rank_pids(home: Path, name: str) -> list[int]:
    """The rank actors' processes on a local cluster (Ray titles them ray::RankActor...)."""
    pids = session_pids(cluster(home, name).session_id)
    return [p for p in pids if any("RankActor" in a for a in cmdline(p))]


def driver_pids(job_id: str) -> list[int]:
    """The Python processes of a job's attempt drivers. Ray starts each driver in a session of
    its own, so they are found by their command line and the attempt spec in their environment."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = cmdline(int(entry.name))
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


@functools.lru_cache(maxsize=8)
def views(home: Path) -> list[ClusterView]:
    """The local fleet's clusters as the controller sees them (storage options included);
    composed once per fleet, so that polling last_step stays fast."""
    from orchestrator.config import compose_run
    from orchestrator.fleet import fleet as fleet_mod

    cfg = compose_run([f"state_dir={home}"])
    return fleet_mod.resolve(cfg.fleet, str(home))


@functools.lru_cache(maxsize=8)
def _stores(home: Path, credentials_mtime: int) -> list[tuple[str, dict]]:
    return [(v.storage_root, v.storage_options) for v in views(home)]


def stores(home: Path) -> list[tuple[str, dict]]:
    """Each cluster's storage root and options. Composing the fleet's config costs more than
    the reads a poll makes, so it is done once per fleet start (fresh S3 keys each time)."""
    creds = credentials_path(home / "fleet" / "local")
    return _stores(home, creds.stat().st_mtime_ns if creds.exists() else 0)


def last_step(home: Path, job_id: str) -> int:
    """The newest step any attempt of the job put in its run files, on any cluster's store:
    fast enough to poll many times a second, so a fault lands where the test means it to."""
    newest = 0
    for storage_root, storage_options in stores(home):
        root = f"{storage_root}/jobs/{job_id}"
        fs, path = open_root(root, storage_options)
        fs.invalidate_cache(path)
        try:
            names = [n.rsplit("/", 1)[-1] for n in fs.ls(path, detail=False)]
        except FileNotFoundError:
            continue
        for name in (n for n in names if n.startswith("attempt-")):
            record = RunDir(f"{root}/{name}", storage_options).last_metrics()
            newest = max(newest, record["step"] if record else 0)
    return newest


class Uninterrupted:
    """The same run, never interrupted, under plain torchrun on `world` ranks; started in the
    background so it overlaps the fault case it is compared with."""

    def __init__(self, home: Path, world: int, overrides: list[str]) -> None:
        key = hashlib.sha256(json.dumps([world, overrides]).encode()).hexdigest()[:12]
        self.run_dir = home / "reference" / key
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={world}", "-m", "recipes.gpt.train", *overrides,
            f"resources.devices={world}", f"run_dir={self.run_dir}",
        ]  # fmt: skip
        env = dict(os.environ, SPILLWAY_HOME=str(home), TMPDIR=str(home / "tmp"))
        self.log_path = home / f"reference-{key}.log"
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        self._losses: dict[int, float] | None = None

    def losses(self) -> dict[int, float]:
        if self._losses is None:
            code = self.proc.wait(timeout=300)
            assert code == 0, self.log_path.read_text()[-3000:]
            records = RunDir(str(self.run_dir)).read_metrics()
            self._losses = {r["step"]: r["loss"] for r in records}
        return self._losses


def assert_losses_match(lines: list[dict], reference: dict[int, float], rel: float) -> None:
    """Every step any attempt ran (redone ones too) has the uninterrupted run's loss."""
    assert sorted({r["step"] for r in lines}) == sorted(reference), "steps missing or extra"
    worst = max(abs(r["loss"] - reference[r["step"]]) / abs(reference[r["step"]]) for r in lines)
    print(f"largest relative loss difference against the uninterrupted run: {worst:.2e}")
    assert worst <= rel, f"largest relative loss difference {worst:.2e} > {rel:.0e}"
