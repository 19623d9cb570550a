"""One attempt, as the controller hands it to the driver on a cluster.

The spec names the attempt; the run config it trains travels beside it, in the attempt's run
dir (orchestrator.rundir), written by the controller just before it submits.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

SPEC_ENV = "SPILLWAY_ATTEMPT_SPEC"

# What a cluster does not need of the run config stored at launch: the fleet names every
# other cluster, their token sources and the controller's address.
NOT_SHIPPED = ("fleet",)


@dataclass(frozen=True)
class AttemptSpec:
    job_id: str
    attempt: int
    world_size: int
    device_resource: str
    run_dir: str
    # Only the job's newest epoch may commit (see CheckpointConfig.fence_url).
    epoch: int = 0
    reserve_timeout_s: float = 120.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> AttemptSpec:
        return cls(**json.loads(os.environ[SPEC_ENV]))


def attempt_run_config(
    run_config: dict[str, Any],
    world_size: int,
    run_dir: str,
    checkpoint_storage: str,
    epoch: int | None = None,
    fence_url: str | None = None,
    resume_step: int | None = None,
    resume_verified: bool = False,
) -> dict[str, Any]:
    """The run config one attempt trains: the one stored at launch, with the keys that belong
    to this attempt pinned (its world size, its run dir, the job's checkpoints on its cluster,
    its epoch and fence, the committed step the controller chose for it to resume from, and
    whether the controller's copy just checked that step's every byte here)."""
    cfg = {k: copy.deepcopy(v) for k, v in run_config.items() if k not in NOT_SHIPPED}
    cfg["resources"] = {**cfg.get("resources", {}), "devices": world_size}
    cfg["run_dir"] = run_dir
    cfg["checkpoint"] = {
        **cfg.get("checkpoint", {}),
        "storage": checkpoint_storage,
        "epoch": epoch,
        "fence_url": fence_url,
        "resume_step": resume_step,
        "resume_verified": resume_verified,
    }
    return cfg
