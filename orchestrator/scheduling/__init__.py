"""Placement policy: which cluster each queued job runs on next, as pure functions.

The controller snapshots the fleet, calls `place` with the queue and its own clock reading,
and acts on the decisions; nothing in this package does I/O.
"""

from orchestrator.scheduling.policy import infeasible, place, queue_order
from orchestrator.scheduling.types import (
    LEASED,
    OWNED,
    ClusterSnapshot,
    Decision,
    JobRequest,
    Placement,
    Wait,
)

__all__ = [
    "LEASED",
    "OWNED",
    "ClusterSnapshot",
    "Decision",
    "JobRequest",
    "Placement",
    "Wait",
    "infeasible",
    "place",
    "queue_order",
]
