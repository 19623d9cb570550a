"""`spillway run`: train a run config here, in the foreground, on local ranks."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from orchestrator.config import compose_run, pick_device_type, validate
from orchestrator.config.compose import ensure_state_dir


def local_env(state_dir: str, nproc: int) -> dict[str, str]:
    """The environment of ranks started on this machine: temp files stay under the state dir."""
    tmp = ensure_state_dir(state_dir) / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SPILLWAY_HOME=state_dir, TMPDIR=str(tmp))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def cmd_run(args: argparse.Namespace) -> int:
    """Train a run config here, in the foreground, on resources.devices local ranks."""
    cfg = compose_run(args.overrides)
    nproc = cfg.resources.devices
    validate(cfg, nproc, device_type=pick_device_type(cfg.trainer.device))
    print(
        f"spillway: {cfg.run_name} on {nproc} local rank(s), run dir {cfg.run_dir}", file=sys.stderr
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", cfg.recipe.module, *args.overrides, f"run_dir={cfg.run_dir}",
    ]  # fmt: skip
    try:
        return subprocess.call(cmd, env=local_env(cfg.state_dir, nproc))
    except KeyboardInterrupt:
        # torchrun has already passed the interrupt on to the ranks; their output says where they stopped.
        return 130
