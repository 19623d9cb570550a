"""The drain request as it reaches ranks started by Spillway: the run dir's drain request file.

The controller (lease ending, `spillway migrate`) and the driver (a SIGTERM from a partner
taking its nodes back) write it through orchestrator.rundir; every rank looks for it at step
boundaries, at most every `check_every_s`, on top of its own SIGTERM handler.
"""

from __future__ import annotations

import time

from recipes.common.drain import SigtermDrain


class MarkerDrain(SigtermDrain):
    def __init__(self, run_dir: str, check_every_s: float = 0.5) -> None:
        super().__init__(run_dir)
        self.check_every_s = check_every_s
        self._checked_at = 0.0

    def requested(self) -> str | None:
        now = time.monotonic()
        if self.reason is None and now - self._checked_at >= self.check_every_s:
            self._checked_at = now
            self.reason = self.run_files.drain_request()
        return self.reason
