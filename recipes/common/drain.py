"""Drain: checkpoint at the next step boundary, acknowledge, exit. One signal for every reason.

A lease ending, `spillway migrate`, a preemption and a SIGTERM from a partner taking its nodes
back all end the same way: every rank agrees at a step boundary, a committed checkpoint of that
step is saved, rank 0 acknowledges in the run dir (orchestrator.rundir), and the process exits
with DRAINED_EXIT, which the controller tells apart from a failure.
"""

from __future__ import annotations

import signal
import threading
from typing import Protocol

from orchestrator import exit_codes
from orchestrator.rundir import RunDir

DRAINED_EXIT = exit_codes.DRAINED
# Not a drain: a newer attempt of the job exists, so this one stopped at a save without
# committing it, and acknowledges nothing (the controller already moved on).
FENCED_EXIT = exit_codes.FENCED


class Drain(Protocol):
    def requested(self) -> str | None:
        """Why this rank was asked to drain, or None."""

    def acknowledge(self, step: int) -> None:
        """Called on rank 0 once the checkpoint of `step` is committed."""


class SigtermDrain:
    """Drains on SIGTERM (or SIGINT): what a partner sends when it takes its nodes back."""

    def __init__(self, run_dir: str | None = None) -> None:
        self.run_files = RunDir(run_dir) if run_dir is not None else None
        self.reason: str | None = None
        # Handlers can only be installed from the main thread; elsewhere the runner drains us.
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.reason = self.reason or signal.Signals(signum).name

    def requested(self) -> str | None:
        return self.reason

    def acknowledge(self, step: int) -> None:
        if self.run_files is not None:
            self.run_files.acknowledge_drain(step, self.reason or "another rank was asked")
