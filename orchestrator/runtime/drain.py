"""The drain request as it reaches ranks started by Spillway: a DRAIN file in the run dir.

The controller (lease ending, `spillway migrate`) and the driver (a SIGTERM from a partner
taking its nodes back) write it; every rank looks for it at step boundaries, at most every
`check_every_s`, on top of its own SIGTERM handler.
"""

from __future__ import annotations

import time

from orchestrator.checkpoint.storage import join, open_root
from recipes.common.drain import SigtermDrain

MARKER = "DRAIN"


def request_drain(run_dir: str, reason: str) -> None:
    fs, path = open_root(run_dir)
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(join(path, MARKER), reason.encode())


class MarkerDrain(SigtermDrain):
    def __init__(self, run_dir: str, check_every_s: float = 0.5) -> None:
        super().__init__(run_dir)
        self.fs, self.marker = open_root(run_dir)
        self.marker = join(self.marker, MARKER)
        self.check_every_s = check_every_s
        self._checked_at = 0.0

    def requested(self) -> str | None:
        now = time.monotonic()
        if self.reason is None and now - self._checked_at >= self.check_every_s:
            self._checked_at = now
            if self.fs.exists(self.marker):
                self.reason = self.fs.cat_file(self.marker).decode() or "drain requested"
        return self.reason
