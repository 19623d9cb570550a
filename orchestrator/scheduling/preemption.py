"""Which running jobs to drain so that a waiting job of higher priority fits: a pure function.

Preemption costs a drain, not work: the victims checkpoint at their next step boundary and go
back to the queue with their checkpoints, behind the job that displaced them.

It runs every tick, after placement, on what placement left: devices placed this tick are
taken, jobs placed this tick need nobody to move, and a cluster held for the head of the queue
is not drained for a job that could not use it. Devices already on their way back (victims
draining) are counted as coming: a job they will fit needs no new victims, and no cluster is
drained again while a drain there is in flight.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from orchestrator.scheduling.policy import accepted, place, queue_order
from orchestrator.scheduling.types import ClusterSnapshot, Decision, JobRequest, Placement, Wait


@dataclass(frozen=True)
class Running:
    job_id: str
    cluster: str
    world_size: int
    priority: int
    started_at: float


@dataclass(frozen=True)
class Preemption:
    job_id: str  # the waiting job the room is made for
    cluster: str
    victims: tuple[str, ...]  # running jobs to drain there, fewest that make it fit


def preemptions(
    waiting: Sequence[JobRequest],
    running: Sequence[Running],
    fleet: Sequence[ClusterSnapshot],
    now: float,
    decided: Sequence[Decision] = (),
    returning: Mapping[str, int] | None = None,
) -> list[Preemption]:
    """For each waiting job, in queue order, that neither fits now nor will fit once the devices
    on their way back arrive: the first cluster in its preference order where draining running
    jobs of strictly lower priority would let it in, and which ones.

    `fleet` is the snapshot placement saw and `decided` what `place` made of it this tick;
    `returning` is, per cluster, the devices of jobs draining there now. Victims go lowest
    priority first, then the most recently started (it has the least to lose should its drain
    be slow); no job is a victim twice, and at most one preemption per cluster is made."""
    coming = {name: n for name, n in (returning or {}).items() if n > 0}
    placed = [d for d in decided if isinstance(d, Placement)]
    free = _free_after(fleet, placed)
    hold = next(((d.holds, d.job_id) for d in decided if isinstance(d, Wait) and d.holds), None)
    placed_ids = {p.job_id for p in placed}
    priority = {j.job_id: j.priority for j in waiting}
    draining = set(coming)  # clusters with a drain in flight, this call's own included
    taken: set[str] = set()
    found: list[Preemption] = []
    for job in queue_order(waiting):
        if job.job_id in placed_ids or now < job.not_before:
            continue  # placed this tick, or backing off: room made now would sit idle
        held = None  # the cluster the head of the queue holds against this job, if any
        if hold is not None and job.priority < priority.get(hold[1], job.priority):
            held = hold[0]
        options = [c for c in accepted(job, fleet) if c.name != held]
        view = [dataclasses.replace(c, devices_free=free[c.name]) for c in options]
        if _fits(job, view, now):
            continue  # it fits as things are: nobody needs to move for it
        if _served_by_drains(job, view, free, coming, now):
            continue
        plan = _victims_for(job, view, running, taken, draining, free, now)
        if plan is not None:
            found.append(plan)
            taken.update(plan.victims)
            draining.add(plan.cluster)
    return found


def _free_after(fleet: Sequence[ClusterSnapshot], placed: Sequence[Placement]) -> dict[str, int]:
    used = Counter()
    for p in placed:
        used[p.cluster] += p.world_size
    return {c.name: max(0, c.devices_free - used[c.name]) for c in fleet}


def _fits(job: JobRequest, view: Sequence[ClusterSnapshot], now: float) -> Placement | None:
    if not view:
        return None
    decision = place([job], view, now)[0]
    return decision if isinstance(decision, Placement) else None


def _served_by_drains(
    job: JobRequest,
    view: Sequence[ClusterSnapshot],
    free: dict[str, int],
    coming: dict[str, int],
    now: float,
) -> bool:
    """Whether `job` fits once the devices on their way back arrive; if so they are counted
    as its, so that a later job does not count them too."""
    widened = [
        dataclasses.replace(c, devices_free=min(c.devices_total, c.devices_free + coming[c.name]))
        for c in view
        if c.name in coming
    ]
    fit = _fits(job, widened, now)
    if fit is None:
        return False
    from_free = min(free[fit.cluster], fit.world_size)
    free[fit.cluster] -= from_free
    coming[fit.cluster] -= fit.world_size - from_free
    return True


def _victims_for(
    job: JobRequest,
    view: Sequence[ClusterSnapshot],
    running: Sequence[Running],
    taken: set[str],
    draining: set[str],
    free: dict[str, int],
    now: float,
) -> Preemption | None:
    for cluster in view:
        if cluster.name in draining:
            continue  # its free count does not show what is already coming back
        candidates = sorted(
            (
                r
                for r in running
                if r.cluster == cluster.name and r.priority < job.priority and r.job_id not in taken
            ),
            key=lambda r: (r.priority, -r.started_at, r.job_id),
        )
        chosen: list[Running] = []
        for victim in candidates:
            chosen.append(victim)
            freed = min(
                cluster.devices_total, cluster.devices_free + sum(r.world_size for r in chosen)
            )
            fit = _fits(job, [dataclasses.replace(cluster, devices_free=freed)], now)
            if fit is not None:
                free[cluster.name] -= min(free[cluster.name], fit.world_size)
                return Preemption(job.job_id, cluster.name, tuple(r.job_id for r in chosen))
    return None
