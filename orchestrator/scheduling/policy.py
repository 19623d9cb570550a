"""Where each queued job runs next: a pure function of the queue, a fleet snapshot and `now`.

Nothing here reads a clock, a file or the network, so the same inputs always give the same
decisions; the controller owns the I/O and can replay any decision in a test.

`place` is greedy over the queue (see `queue_order`) with a private copy of the free-device
counts: a job takes the first cluster in its preference order that can host its whole gang
now, and earlier jobs consume capacity first. A later, smaller job may backfill capacity an
earlier, bigger one could not use, with one exception that keeps a big job from starving: the
first job in queue order that waits for devices alone (some cluster it accepts would take it
if that cluster were empty) holds that cluster's free devices, the first such cluster in its
preference order, against every job of lower priority behind it. Those may still use other
clusters, and jobs of its own priority may still backfill.

A job's preference order, over clusters that are reachable, of an accepted device type and,
if leased, inside their lease window at `now`:
  - with an explicit `clusters` list: that list's order (the user's preference wins);
  - otherwise owned clusters before leased ones ("ordered spillover"), each group ordered by
    the job's device-type preference, then fleet order.

A job backing off (`now < not_before`) waits whatever is free. Otherwise a cluster in that
order takes the job when, in this order of checks:
  1. some allowed world size fits its free devices; the job gets the largest that does;
  2. leased: the lease has at least `min_lease_left_s` left;
  3. `cost_so_far + projected_cost <= budget` (see `_projected_cost`);
  4. leased: the job has waited `spill_after_s` since `waiting_since`.
Walking the order is what makes "owned first": a lease is only reached once every owned
cluster before it has refused. The spill wait is checked last so that a lease refused by it
alone is known to be the blocker, and the Wait says so.

`hold_past_unknown` then turns into a Wait each Placement that passes over a cluster the
job prefers while that cluster is neither up nor lost (see loss.known).

A Wait's reason is stable text and its detail the live numbers (see reasons.py); a job that
can never run (see `infeasible`) gets that permanent reason rather than a momentary one.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from orchestrator.scheduling import reasons
from orchestrator.scheduling.reasons import Refusal
from orchestrator.scheduling.types import (
    LEASED,
    OWNED,
    ClusterSnapshot,
    Decision,
    JobRequest,
    Placement,
    Wait,
)


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
    hold: _Hold | None = None
    decisions: list[Decision] = []
    for job in queue_order(jobs):
        key = (job.clusters, job.device_types)
        if key not in options:
            options[key] = _options(job, fleet, now)
        decision = _decide(job, fleet, options[key], free, now, hold)
        if isinstance(decision, Placement):
            free[decision.cluster] -= decision.world_size
        elif decision.holds is not None:
            hold = _Hold(decision.holds, job.job_id, job.priority)
        decisions.append(decision)
    return decisions


def hold_past_unknown(
    decisions: Sequence[Decision],
    jobs: Sequence[JobRequest],
    fleet: Sequence[ClusterSnapshot],
    unknown: Collection[str],
    now: float,
) -> list[Decision]:
    """`decisions` with each Placement that passes over a cluster in `unknown` made a Wait.

    `unknown`: clusters neither up nor lost (their last probe failed, short of being declared
    lost; or none answered yet). A job prefers such a cluster when it comes before the placed
    one in the job's order and could take it when empty, in its lease window. Placing past it
    would send the job elsewhere for the rest of its run on the strength of one probe that
    timed out under load; waiting costs at most the fleet's lost_after_s, after which the
    cluster is up again or lost (and then known)."""
    by_id = {j.job_id: j for j in jobs}
    out: list[Decision] = []
    for decision in decisions:
        job = by_id.get(decision.job_id)
        if not isinstance(decision, Placement) or job is None:
            out.append(decision)
            continue
        passed = []
        for cluster in _accepted(job, fleet):
            if cluster.name == decision.cluster:
                break
            in_window = cluster.kind != LEASED or cluster.lease_start <= now < cluster.lease_end
            fits = cluster.devices_total >= job.world_sizes[0]
            if cluster.name in unknown and in_window and fits:
                passed.append(cluster.name)
        out.append(Wait(job.job_id, reasons.not_heard_from(passed)) if passed else decision)
    return out


def infeasible(job: JobRequest, fleet: Sequence[ClusterSnapshot]) -> str | None:
    """Why no accepted cluster could ever take `job`, whatever is free and whenever; else None.

    For submission time: ignores free devices, reachability and lease timing, all of which
    change. If this returns a reason, `place` never places the job.
    """
    refusal = _static_refusal(job, fleet, _accepted(job, fleet))
    return None if refusal is None else refusal.text


def accepted(job: JobRequest, fleet: Sequence[ClusterSnapshot]) -> list[ClusterSnapshot]:
    """Clusters the job accepts by name and device type, in its preference order, whatever
    their state."""
    return _accepted(job, fleet)


@dataclass(frozen=True)
class _Options:
    accepted: tuple[ClusterSnapshot, ...]  # in preference order, whatever their state
    usable: tuple[ClusterSnapshot, ...]  # the accepted ones that can be used at `now`
    unusable: Refusal | None  # why the first accepted-but-unusable one is not usable


@dataclass(frozen=True)
class _Hold:
    cluster: str
    job_id: str
    priority: int


def _options(job: JobRequest, fleet: Sequence[ClusterSnapshot], now: float) -> _Options:
    accepted = _accepted(job, fleet)
    usable, first_refusal = [], None
    for cluster in accepted:
        refusal = _unusable(cluster, now)
        if refusal is None:
            usable.append(cluster)
        elif first_refusal is None:
            first_refusal = refusal
    return _Options(tuple(accepted), tuple(usable), first_refusal)


def _accepted(job: JobRequest, fleet: Sequence[ClusterSnapshot]) -> list[ClusterSnapshot]:
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


def _unusable(cluster: ClusterSnapshot, now: float) -> Refusal | None:
    if not cluster.reachable:
        return reasons.unreachable(cluster)
    if cluster.kind == LEASED:
        if now < cluster.lease_start:
            return reasons.lease_not_started(cluster, now)
        if now >= cluster.lease_end:
            return reasons.lease_over(cluster, now)
    return None


def _decide(
    job: JobRequest,
    fleet: Sequence[ClusterSnapshot],
    options: _Options,
    free: dict[str, int],
    now: float,
    hold: _Hold | None,
) -> Decision:
    if now < job.not_before:
        static = _static_refusal(job, fleet, options.accepted)
        return _wait(job, static or reasons.backing_off(job, now))
    waited = now - job.waiting_since
    first: Refusal | None = None
    spill: Refusal | None = None  # set when a lease was refused by the spill wait alone
    smallest = job.world_sizes[0]
    for cluster in options.usable:
        free_now = free[cluster.name]
        if hold is not None and hold.cluster == cluster.name and job.priority < hold.priority:
            first = first or reasons.held(cluster, free_now, hold.job_id, hold.priority)
            continue
        if free_now < smallest:  # the common case on a busy fleet, so decided here, inline
            first = first or reasons.too_few_devices(job, cluster, free_now)
            continue
        outcome = _try(job, cluster, free_now, now, waited)
        if isinstance(outcome, Placement):
            return outcome
        if outcome.kind == reasons.SPILL:
            spill = spill or outcome
        first = first or outcome
    static = _static_refusal(job, fleet, options.accepted)
    if static is not None:  # a permanent reason beats a momentary one: change the job
        return _wait(job, static)
    holds = None if hold is not None else _first_fit_when_empty(job, options.usable, now, waited)
    if first is None:  # no accepted cluster is usable now
        return _wait(job, options.unusable or reasons.NONE_USABLE, holds)
    if spill is not None and spill is not first:
        # The preferred cluster's refusal alone would hide that a lease is ready and only the
        # spill wait holds the job back.
        joined = Refusal(
            spill.kind, f"{spill.text}; {first.text}", {**first.detail, **spill.detail}
        )
        return _wait(job, joined, holds)
    return _wait(job, first, holds)


def _try(
    job: JobRequest, cluster: ClusterSnapshot, free_now: int, now: float, waited: float
) -> Placement | Refusal | None:
    """Whether `cluster` with `free_now` devices free takes `job`: the Placement, else why not;
    None when no allowed world size fits (the caller describes that, if it reports it)."""
    size = _largest_fit(job.world_sizes, free_now)
    if size is None:
        return None
    cost = _projected_cost(job, cluster, size, now)
    refusal = _lease_refusal(job, cluster, now) or _budget_refusal(job, cluster, cost)
    if refusal is not None:
        return refusal
    if cluster.kind == OWNED or waited >= job.spill_after_s:
        return Placement(job.job_id, cluster.name, size, cost)
    return reasons.spill_wait(job, cluster, waited)


def _first_fit_when_empty(
    job: JobRequest, usable: Sequence[ClusterSnapshot], now: float, waited: float
) -> str | None:
    """The first usable cluster that would take the waiting `job` if all its devices were free:
    where it waits for devices alone, and so the cluster it holds when first in the queue."""
    for cluster in usable:
        taken = _try(job, cluster, cluster.devices_total, now, waited)
        if isinstance(taken, Placement):
            return cluster.name
    return None


def _wait(job: JobRequest, refusal: Refusal, holds: str | None = None) -> Wait:
    return Wait(job.job_id, refusal.text, dict(refusal.detail), holds)


def _static_refusal(
    job: JobRequest, fleet: Sequence[ClusterSnapshot], accepted: Sequence[ClusterSnapshot]
) -> Refusal | None:
    if not accepted:
        return reasons.none_accepted(job, fleet)
    largest = max(accepted, key=lambda c: c.devices_total)  # first of the largest, by preference
    if largest.devices_total < job.world_sizes[0]:
        return reasons.too_big(job, largest)
    if job.budget is not None and job.cost_so_far > job.budget:
        return reasons.budget_spent(job)
    return None


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


def _lease_refusal(job: JobRequest, cluster: ClusterSnapshot, now: float) -> Refusal | None:
    if cluster.kind != LEASED:
        return None
    left = cluster.lease_end - now
    if left >= job.min_lease_left_s:
        return None
    return reasons.lease_too_short(job, cluster, left)


def _budget_refusal(job: JobRequest, cluster: ClusterSnapshot, cost: float) -> Refusal | None:
    if job.budget is None or job.cost_so_far + cost <= job.budget:
        return None
    return reasons.over_budget(job, cluster, cost)


def _require_unique(what: str, keys: list[str]) -> None:
    dupes = sorted(k for k, n in Counter(keys).items() if n > 1)
    if dupes:
        raise ValueError(f"duplicate {what}: {', '.join(dupes)}")
