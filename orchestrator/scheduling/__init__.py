"""The controller's decisions, as pure functions: placement, preemption, back-off, budgets, the
lease watch, return home and loss detection.

The controller observes the fleet, calls these with frozen values and its own clock reading,
and acts on what they return; nothing in this package does I/O.
"""

from orchestrator.scheduling.backoff import backoff_s, retry_at
from orchestrator.scheduling.budget import attempt_cost, budget_cause, drain_cost, over_budget
from orchestrator.scheduling.home import AwayRun, HomeMove, return_home_moves
from orchestrator.scheduling.leases import OnLease, lease_drains
from orchestrator.scheduling.loss import ProbeHistory, observe, verdict
from orchestrator.scheduling.policy import (
    accepted,
    hold_past_unknown,
    infeasible,
    place,
    queue_order,
)
from orchestrator.scheduling.preemption import Preemption, Running, preemptions
from orchestrator.scheduling.types import (
    LEASED,
    OWNED,
    ClusterSnapshot,
    Decision,
    Detail,
    JobRequest,
    Placement,
    Wait,
)

__all__ = [
    "LEASED",
    "OWNED",
    "AwayRun",
    "ClusterSnapshot",
    "Decision",
    "Detail",
    "HomeMove",
    "JobRequest",
    "OnLease",
    "Placement",
    "Preemption",
    "ProbeHistory",
    "Running",
    "Wait",
    "accepted",
    "attempt_cost",
    "backoff_s",
    "budget_cause",
    "drain_cost",
    "hold_past_unknown",
    "infeasible",
    "lease_drains",
    "observe",
    "over_budget",
    "place",
    "preemptions",
    "queue_order",
    "retry_at",
    "return_home_moves",
    "verdict",
]
