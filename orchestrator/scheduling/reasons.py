"""Why a job waits: one stable line per blocking fact, with the live numbers kept apart.

A reason's text names only what stays put while the job waits on the same thing (cluster
names, sizes, config values), so the controller records a reason when it changes rather than
every tick; the numbers that move (free devices, seconds left, cost) go to `detail`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from orchestrator.scheduling.types import ClusterSnapshot, Detail, JobRequest

MAX_NAMES_IN_REASON = 8

# What kind of fact refused a cluster; the policy treats SPILL apart (see policy._decide).
CAPACITY = "capacity"
HELD = "held"
LEASE = "lease"
BUDGET = "budget"
SPILL = "spill"
UNUSABLE = "unusable"
STATIC = "static"
BACKOFF = "backoff"


@dataclass(frozen=True)
class Refusal:
    kind: str
    text: str
    detail: Detail = field(default_factory=dict)


def not_heard_from(names: Sequence[str]) -> str:
    """Why a job is not placed past a cluster it prefers: that cluster's last probe failed (or
    none ended yet, as in the controller's first seconds) and it has not been declared lost."""
    return (
        f"waiting for an answer from {', '.join(names)} "
        "(its last probe failed; it is up again or lost within lost_after_s)"
    )


def unreachable(cluster: ClusterSnapshot) -> Refusal:
    return Refusal(UNUSABLE, f"{cluster.name}: unreachable")


def lease_not_started(cluster: ClusterSnapshot, now: float) -> Refusal:
    return Refusal(
        UNUSABLE,
        f"{cluster.name}: lease has not started",
        {"lease_starts_in_s": cluster.lease_start - now},
    )


def lease_over(cluster: ClusterSnapshot, now: float) -> Refusal:
    return Refusal(
        UNUSABLE, f"{cluster.name}: lease has ended", {"lease_ended_s_ago": now - cluster.lease_end}
    )


def too_few_devices(job: JobRequest, cluster: ClusterSnapshot, free: int) -> Refusal:
    return Refusal(
        CAPACITY,
        f"{cluster.name}: fewer than {job.world_sizes[0]} devices free "
        f"(of {cluster.devices_total})",
        {"devices_free": free},
    )


def held(cluster: ClusterSnapshot, free: int, holder: str, priority: int) -> Refusal:
    return Refusal(
        HELD,
        f"{cluster.name}: free devices held for {holder} (priority {priority}), first in the queue",
        {"devices_free": free},
    )


def lease_too_short(job: JobRequest, cluster: ClusterSnapshot, left: float) -> Refusal:
    return Refusal(
        LEASE,
        f"{cluster.name}: lease ends sooner than "
        f"placement.min_lease_left_s={num(job.min_lease_left_s)}",
        {"lease_left_s": left},
    )


def over_budget(job: JobRequest, cluster: ClusterSnapshot, cost: float) -> Refusal:
    return Refusal(
        BUDGET,
        f"{cluster.name}: projected cost exceeds what is left of placement.budget={job.budget:.2f}",
        {"projected_cost": cost, "budget_left": job.budget - job.cost_so_far},
    )


def spill_wait(job: JobRequest, cluster: ClusterSnapshot, waited: float) -> Refusal:
    return Refusal(
        SPILL,
        f"waiting placement.spill_after_s={num(job.spill_after_s)} for owned capacity "
        f"before using {cluster.name}",
        {"waited_s": waited},
    )


def backing_off(job: JobRequest, now: float) -> Refusal:
    tries = "attempt" if job.failures == 1 else "attempts"
    return Refusal(
        BACKOFF,
        f"backing off after {job.failures} failed {tries} to start",
        {"retry_in_s": job.not_before - now, "not_before": job.not_before},
    )


def too_big(job: JobRequest, largest: ClusterSnapshot) -> Refusal:
    return Refusal(
        STATIC,
        f"wants {at_least(job)}{job.world_sizes[0]} devices; the largest accepted cluster "
        f"({largest.name}) has {largest.devices_total}",
    )


def budget_spent(job: JobRequest) -> Refusal:
    return Refusal(
        STATIC,
        f"cost so far already exceeds placement.budget={job.budget:.2f}",
        {"cost_so_far": job.cost_so_far},
    )


def none_accepted(job: JobRequest, fleet: Sequence[ClusterSnapshot]) -> Refusal:
    if not fleet:
        return Refusal(STATIC, "the fleet has no clusters")
    names = {c.name for c in fleet}
    if job.clusters and not any(n in names for n in job.clusters):
        return Refusal(
            STATIC,
            "placement.clusters names no cluster of the fleet "
            f"(fleet: {_names([c.name for c in fleet])})",
        )
    named = [c for c in fleet if not job.clusters or c.name in job.clusters]
    have = _names(list(dict.fromkeys(c.device_type for c in named)))
    return Refusal(
        STATIC,
        f"no accepted cluster has device type {' or '.join(job.device_types)} (they have {have})",
    )


NONE_USABLE = Refusal(UNUSABLE, "no accepted cluster is usable now")


def at_least(job: JobRequest) -> str:
    return "at least " if len(job.world_sizes) > 1 else ""


def num(x: float) -> str:
    # Whole seconds read best; keep a decimal where it matters (0.5s is not 1s).
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def _names(names: list[str]) -> str:
    if len(names) <= MAX_NAMES_IN_REASON:
        return ", ".join(names)
    shown = ", ".join(names[:MAX_NAMES_IN_REASON])
    return f"{shown} and {len(names) - MAX_NAMES_IN_REASON} more"
