"""The drain request as it reaches ranks started by Spillway: the run dir's drain request file.

The controller (lease ending, `spillway migrate`) and the driver (a SIGTERM from a partner
taking its nodes back) write it through orchestrator.rundir. Only rank 0 looks for it, on a
thread of its own every `check_every_s`, so no rank's training loop ever waits on storage; the
step boundary's all-reduce (recipes.common.boundary) carries rank 0's answer to every rank, on
top of each rank's own SIGTERM handler.
"""

from __future__ import annotations

import logging
import threading

from recipes.common.drain import SigtermDrain

log = logging.getLogger("spillway.drain")


class MarkerDrain(SigtermDrain):
    def __init__(self, run_dir: str, rank: int, check_every_s: float = 0.5) -> None:
        super().__init__(run_dir)
        self.check_every_s = check_every_s
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        if rank == 0:
            self._watcher = threading.Thread(
                target=self._watch, name="drain-request", daemon=True
            )
            self._watcher.start()

    def _watch(self) -> None:
        while self.reason is None and not self._stop.wait(self.check_every_s):
            try:
                found = self.run_files.drain_request()
            except Exception as exc:  # a storage hiccup: look again next time
                log.warning("spillway: could not read the drain request: %s", exc)
                continue
            if found is not None:
                self.reason = self.reason or found

    def close(self) -> None:
        self._stop.set()
