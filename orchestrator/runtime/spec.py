"""One attempt, as the controller hands it to the driver on a cluster."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

SPEC_ENV = "SPILLWAY_ATTEMPT_SPEC"


@dataclass(frozen=True)
class AttemptSpec:
    job_id: str
    attempt: int
    world_size: int
    device_resource: str
    run_dir: str
    # Hydra overrides of the run config, with run_dir and checkpoint.storage already pinned.
    overrides: list[str] = field(default_factory=list)
    reserve_timeout_s: float = 120.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> AttemptSpec:
        return cls(**json.loads(os.environ[SPEC_ENV]))
