"""The job and attempt state machine lives in orchestrator.scheduling.job_states, where the CLI
may read the state names too; the controller keeps importing it from here."""

from orchestrator.scheduling.job_states import (
    ACTIVE_ATTEMPT,
    ALLOWED,
    HOLDS_DEVICES,
    TERMINAL,
    AttemptState,
    JobState,
)

__all__ = ["ACTIVE_ATTEMPT", "ALLOWED", "HOLDS_DEVICES", "TERMINAL", "AttemptState", "JobState"]
