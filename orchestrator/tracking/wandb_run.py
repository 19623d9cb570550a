"""A wandb run that a resumed job continues under the same id (offline unless told otherwise)."""

from __future__ import annotations

import os
import uuid
from typing import Any


def new_run_id() -> str:
    # wandb ids are short lowercase alphanumerics; this shape is valid for wandb and readable.
    return uuid.uuid4().hex[:12]


class WandbRun:
    def __init__(self, logger_cfg, run_id: str, run_dir: str, config: dict[str, Any]) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self._wandb = wandb
        self.run = wandb.init(
            project=logger_cfg.project,
            entity=logger_cfg.entity,
            mode=logger_cfg.mode,
            id=run_id,
            resume="allow",
            dir=run_dir,
            config=config,
        )

    def log(self, record: dict[str, Any], step: int) -> None:
        self.run.log(record, step=step)

    def close(self) -> None:
        self.run.finish()
