"""Where each queued job runs next: a pure function of the queue, a fleet snapshot and `now`.

Nothing here reads a clock, a file or the network, so the same inputs always give the same
decisions; the controller owns the I/O and can replay any decision in a test.

`place` is greedy over the queue (see `queue_order`) with a private copy of the free-device
counts: a job takes the first cluster in its preference order that can host its whole gang
now, earlier jobs consume capacity first, and a later, smaller job may backfill capacity an
earlier, bigger one could not use (no reservations).

A job's preference order, over clusters that are reachable, of an accepted device type and,
if leased, inside their lease window at `now`:
  - with an explicit `clusters` list: that list's order (the user's preference wins);
  - otherwise owned clusters before leased ones ("ordered spillover"), each group ordered by
    the job's device-type preference, then fleet order.

A cluster in that order takes the job when, in this order of checks:
  1. some allowed world size fits its free devices; the job gets the largest that does;
  2. leased: the lease has at least `min_lease_left_s` left;
  3. `cost_so_far + projected_cost <= budget` (see `_projected_cost`);
  4. leased: the job has waited `spill_after_s` since `waiting_since`.
Walking the order is what makes "owned first": a lease is only reached once every owned
cluster before it has refused. The spill wait is checked last so that a lease refused by it
alone is known to be the blocker, and the Wait says so.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from orchestrator.scheduling.types import (
    LEASED,
    OWNED,
    ClusterSnapshot,
    Decision,
    JobRequest,
    Placement,
    Wait,
)

_MAX_NAMES_IN_REASON = 8


def queue_order(jobs: Iterable[JobRequest]) -> list[JobRequest]:
    """Priority descending, then submitted_at ascending (FIFO), then job_id."""
    return sorted(jobs, key=lambda j: (-j.priority, j.submitted_at, j.job_id))


def place(
    jobs: Sequence[JobRequest], fleet: Sequence[ClusterSnapshot], now: float
) -> list[Decision]:
    """One Placement or Wait per job, in queue order (rules in the module docstring).

    Raises ValueError on duplicate job ids or cluster names: decisions are keyed by them, and
    duplicates would make the outcome depend on the order of the input list.
    """
    _require_unique("job_id", [j.job_id for j in jobs])
    _require_unique("cluster name", [c.name for c in fleet])
    free = {c.name: c.devices_free for c in fleet}
    # Options depend only on a job's two preference lists (reachability and lease windows are
    # fixed for one `now`), and a long queue repeats a few of those.
    options: dict[tuple[tuple[str, ...], tuple[str, ...]], _Options] = {}
    decisions: list[Decision] = []
    for job in queue_order(jobs):
        key = (job.clusters, job.device_types)
        if key not in options:
            options[key] = _options(job, fleet, now)
        decision = _decide(job, fleet, options[key], free, now)
        if isinstance(decision, Placement):
            free[decision.cluster] -= decision.world_size
        decisions.append(decision)
    return decisions


def infeasible(job: JobRequest, fleet: Sequence[ClusterSnapshot]) -> str | None:
    """Why no accepted cluster could ever take `job`, whatever is free and whenever; else None.

    For submission time: ignores free devices, reachability and lease timing, all of which
    change. If this returns a reason, `place` never places the job.
    """
    return _static_refusal(job, fleet, _accepted(job, fleet))


@dataclass(frozen=True)
class _Options:
    accepted: tuple[ClusterSnapshot, ...]  # in preference order, whatever their state
    usable: tuple[ClusterSnapshot, ...]  # the accepted ones that can be used at `now`
    unusable_reason: str | None  # why the first accepted-but-unusable one is not usable


def _options(job: JobRequest, fleet: Sequence[ClusterSnapshot], now: float) -> _Options:
    accepted = _accepted(job, fleet)
    usable, first_reason = [], None
    for cluster in accepted:
        reason = _unusable(cluster, now)
        if reason is None:
            usable.append(cluster)
        elif first_reason is None:
            first_reason = reason
    return _Options(tuple(accepted), tuple(usable), first_reason)


def _accepted(job: JobRequest, fleet: Sequence[ClusterSnapshot]) -> list[ClusterSnapshot]:
    """Clusters the job accepts by name and device type, in its preference order."""
    if job.clusters:
        by_name = {c.name: c for c in fleet}
        # Unknown names are ignored: a cluster may leave the fleet after the job was submitted.
        named = [by_name[n] for n in dict.fromkeys(job.clusters) if n in by_name]
    else:
        named = list(fleet)
    if job.device_types:
        named = [c for c in named if c.device_type in job.device_types]
    if job.clusters:
        return named
    rank = {t: i for i, t in enumerate(job.device_types)}
    # sorted() is stable, so fleet order breaks the remaining ties.
    return sorted(named, key=lambda c: (c.kind != OWNED, rank.get(c.device_type, 0)))


def _unusable(cluster: ClusterSnapshot, now: float) -> str | None:
    if not cluster.reachable:
        return f"{cluster.name}: unreachable"
    if cluster.kind == LEASED:
        if now < cluster.lease_start:
            return f"{cluster.name}: lease starts in {_num(cluster.lease_start - now)}s"
        if now >= cluster.lease_end:
            return f"{cluster.name}: lease ended {_num(now - cluster.lease_end)}s ago"
    return None


def _decide(
    job: JobRequest,
    fleet: Sequence[ClusterSnapshot],
    options: _Options,
    free: dict[str, int],
    now: float,
) -> Decision:
    waited = now - job.waiting_since
    first_refusal: str | None = None
    spill_wait: str | None = None  # set when a lease was refused by the spill wait alone
    for cluster in options.usable:
        free_now = free[cluster.name]
        size = _largest_fit(job.world_sizes, free_now)
        if size is None:
            if first_refusal is None:  # only the first refusal is reported; skip the rest's text
                first_refusal = _capacity_refusal(job, cluster, free_now)
            continue
        cost = _projected_cost(job, cluster, size, now)
        refusal = _lease_refusal(job, cluster, now) or _budget_refusal(job, cluster, cost)
        if refusal is None:
            if cluster.kind == OWNED or waited >= job.spill_after_s:
                return Placement(job.job_id, cluster.name, size, cost)
            refusal = (
                f"waiting {_num(waited)}s of placement.spill_after_s="
                f"{_num(job.spill_after_s)} for owned capacity before using {cluster.name}"
            )
            spill_wait = spill_wait or refusal
        first_refusal = first_refusal or refusal
    return Wait(job.job_id, _wait_reason(job, fleet, options, first_refusal, spill_wait))


def _wait_reason(
    job: JobRequest,
    fleet: Sequence[ClusterSnapshot],
    options: _Options,
    first_refusal: str | None,
    spill_wait: str | None,
) -> str:
    # A permanent reason beats a momentary one: it tells the user to change the job.
    static = _static_refusal(job, fleet, options.accepted)
    if static is not None:
        return static
    if first_refusal is None:  # no accepted cluster is usable now
        return options.unusable_reason or "no accepted cluster is usable now"
    if spill_wait is not None and spill_wait != first_refusal:
        # The preferred cluster's refusal alone would hide that a lease is ready and only the
        # spill wait holds the job back.
        return f"{spill_wait}; {first_refusal}"
    return first_refusal


def _static_refusal(
    job: JobRequest, fleet: Sequence[ClusterSnapshot], accepted: Sequence[ClusterSnapshot]
) -> str | None:
    if not accepted:
        return _why_none_accepted(job, fleet)
    need = job.world_sizes[0]
    largest = max(accepted, key=lambda c: c.devices_total)  # first of the largest, by preference
    if largest.devices_total < need:
        return (
            f"wants {_at_least(job)}{need} devices; the largest accepted cluster "
            f"({largest.name}) has {largest.devices_total}"
        )
    if job.budget is not None and job.cost_so_far > job.budget:
        return f"cost so far {job.cost_so_far:.2f} already exceeds budget {job.budget:.2f}"
    return None


def _why_none_accepted(job: JobRequest, fleet: Sequence[ClusterSnapshot]) -> str:
    if not fleet:
        return "the fleet has no clusters"
    names = {c.name for c in fleet}
    if job.clusters and not any(n in names for n in job.clusters):
        return (
            "placement.clusters names no cluster of the fleet "
            f"(fleet: {_names([c.name for c in fleet])})"
        )
    named = [c for c in fleet if not job.clusters or c.name in job.clusters]
    have = _names(list(dict.fromkeys(c.device_type for c in named)))
    return f"no accepted cluster has device type {' or '.join(job.device_types)} (they have {have})"


def _largest_fit(world_sizes: tuple[int, ...], free: int) -> int | None:
    i = bisect.bisect_right(world_sizes, free)  # world_sizes is ascending (JobRequest checks)
    return world_sizes[i - 1] if i else None


def _projected_cost(
    job: JobRequest, cluster: ClusterSnapshot, world_size: int, now: float
) -> float:
    """Cost of running the rest of the job on `cluster` at `world_size`.

    On a lease with an unknown remaining time this is the most it can cost there (until the
    lease ends); on an owned cluster an unknown remaining time counts as zero, since owned
    capacity is already paid for and its rate is usually 0.
    """
    if cluster.kind == LEASED:
        lease_left = cluster.lease_end - now
        remaining = job.expected_remaining_s
        seconds = lease_left if remaining is None else min(remaining, lease_left)
    else:
        seconds = job.expected_remaining_s or 0.0
    hours = seconds / 3600
    return world_size * cluster.cost_per_device_hour * hours


def _capacity_refusal(job: JobRequest, cluster: ClusterSnapshot, free: int) -> str:
    return (
        f"{cluster.name}: {free} of {cluster.devices_total} devices free, "
        f"needs {_at_least(job)}{job.world_sizes[0]}"
    )


def _lease_refusal(job: JobRequest, cluster: ClusterSnapshot, now: float) -> str | None:
    if cluster.kind != LEASED:
        return None
    left = cluster.lease_end - now
    if left >= job.min_lease_left_s:
        return None
    return (
        f"{cluster.name}: lease ends in {_num(left)}s, "
        f"placement.min_lease_left_s is {_num(job.min_lease_left_s)}"
    )


def _budget_refusal(job: JobRequest, cluster: ClusterSnapshot, cost: float) -> str | None:
    if job.budget is None or job.cost_so_far + cost <= job.budget:
        return None
    return (
        f"{cluster.name}: projected cost {cost:.2f} exceeds remaining budget "
        f"{job.budget - job.cost_so_far:.2f}"
    )


def _at_least(job: JobRequest) -> str:
    return "at least " if len(job.world_sizes) > 1 else ""


def _num(x: float) -> str:
    # Whole seconds read best; keep a decimal where it matters (0.5s is not 1s).
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def _names(names: list[str]) -> str:
    if len(names) <= _MAX_NAMES_IN_REASON:
        return ", ".join(names)
    shown = ", ".join(names[:_MAX_NAMES_IN_REASON])
    return f"{shown} and {len(names) - _MAX_NAMES_IN_REASON} more"


def _require_unique(what: str, keys: list[str]) -> None:
    dupes = sorted(k for k, n in Counter(keys).items() if n > 1)
    if dupes:
        raise ValueError(f"duplicate {what}: {', '.join(dupes)}")
