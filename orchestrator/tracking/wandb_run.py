"""A wandb run that a resumed job continues under the same id (offline unless told otherwise).

wandb writes its files with plain file I/O, so it always gets a local directory: the run dir
itself when that is a local path, else a local one that close() uploads to RUN_DIR/wandb.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from typing import Any

from orchestrator.checkpoint.storage import join, open_root


def new_run_id() -> str:
    # wandb ids are short lowercase alphanumerics; this shape is valid for wandb and readable.
    return uuid.uuid4().hex[:12]


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


class WandbRun:
    def __init__(self, logger_cfg, run_id: str, run_dir: str, config: dict[str, Any]) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self._wandb = wandb
        self.run_dir = run_dir
        if is_local(run_dir):
            self.local_dir, self._upload = open_root(run_dir)[1], False
            os.makedirs(self.local_dir, exist_ok=True)
        else:
            self.local_dir, self._upload = tempfile.mkdtemp(prefix="spillway-wandb-"), True
        self.run = wandb.init(
            project=logger_cfg.project,
            entity=logger_cfg.entity,
            mode=logger_cfg.mode,
            id=run_id,
            resume="allow",
            dir=self.local_dir,
            config=config,
        )

    def log(self, record: dict[str, Any], step: int) -> None:
        self.run.log(record, step=step)

    def close(self) -> None:
        self.run.finish()
        if self._upload:
            fs, path = open_root(self.run_dir)
            fs.put(join(self.local_dir, "wandb"), join(path, "wandb"), recursive=True)
            shutil.rmtree(self.local_dir, ignore_errors=True)
