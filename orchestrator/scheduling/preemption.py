"""Which running jobs to drain so that a waiting job of higher priority fits: a pure function.

Preemption costs a drain, not work: the victims checkpoint at their next step boundary and go
back to the queue with their checkpoints, behind the job that displaced them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.scheduling.policy import _accepted, place, queue_order
from orchestrator.scheduling.types import ClusterSnapshot, JobRequest, Placement


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
) -> list[Preemption]:
    """For each waiting job, in queue order, that `place` cannot place now: the first cluster
    in its preference order where draining running jobs of strictly lower priority would let
    it in, and which ones. Victims go lowest priority first, then the most recently started
    (it has the least to lose should its drain be slow); no job is a victim twice."""
    taken: set[str] = set()
    found: list[Preemption] = []
    for job in queue_order(waiting):
        if isinstance(place([job], fleet, now)[0], Placement):
            continue  # it fits as things are: nobody needs to move for it
        for cluster in _accepted(job, fleet):
            candidates = sorted(
                (
                    r
                    for r in running
                    if r.cluster == cluster.name
                    and r.priority < job.priority
                    and r.job_id not in taken
                ),
                key=lambda r: (r.priority, -r.started_at, r.job_id),
            )
            chosen: list[Running] = []
            for victim in candidates:
                chosen.append(victim)
                freed = min(
                    cluster.devices_total,
                    cluster.devices_free + sum(r.world_size for r in chosen),
                )
                widened = dataclasses.replace(cluster, devices_free=freed)
                if isinstance(place([job], [widened], now)[0], Placement):
                    victims = tuple(r.job_id for r in chosen)
                    found.append(Preemption(job.job_id, cluster.name, victims))
                    taken.update(victims)
                    break
            else:
                continue
            break
    return found
