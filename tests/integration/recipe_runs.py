"""Start the GPT recipe for real, under torchrun, the way a user or the CLI does."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from orchestrator.rundir import RunDir

REPO = Path(__file__).resolve().parents[2]

# Small enough for seconds on 2 cores; global batch 8 with micro-batch 2 means 2 accumulation
# steps on 2 ranks and 4 on 1, so a world-size change also changes the reduction order.
BASE = (
    "model=tiny",
    "data=synthetic",
    "data.seq_len=32",
    "trainer.max_steps=12",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=2",
    "optim.warmup_steps=2",
    "checkpoint.every_steps=3",
    "checkpoint.keep=4",
    # Tests that watch a run act on its metrics: have them in the run dir within 0.1 s.
    "logger.metrics_flush_s=0.1",
)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path

    @property
    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in RunDir(str(self.run_dir)).read_metrics()}

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"


def torchrun(nproc: int, run_dir: Path, *overrides: str, timeout: int = 240) -> Run:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "recipes.gpt.train", *BASE, *overrides, f"run_dir={run_dir}",
    ]  # fmt: skip
    done = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=dict(os.environ)
    )
    return Run(done.returncode, done.stdout, done.stderr, run_dir)


def ok(run: Run) -> Run:
    assert run.returncode == 0, f"recipe failed ({run.returncode}):\n{run.stderr[-4000:]}"
    return run
