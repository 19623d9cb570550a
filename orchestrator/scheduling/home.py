"""placement.return_home: which jobs running on a lease move to an owned cluster now. Pure.

Owned room goes to the queue first: an owned cluster that some waiting job accepts (and could
hold when empty) is not offered to a job that already runs elsewhere, and neither is one with
a move to it already in flight. Every other owned cluster is fair game, whatever waits for the
rest of the fleet. At most one move per owned cluster per tick: the next decision about that
cluster must see this one's effect.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from orchestrator.scheduling.policy import accepted, place, queue_order
from orchestrator.scheduling.types import OWNED, ClusterSnapshot, JobRequest, Placement


@dataclass(frozen=True)
class AwayRun:
    """A RUNNING attempt on a lease whose job has placement.return_home set."""

    request: JobRequest  # its `clusters`: the job's own accepted list, not a pinned next one
    cluster: str  # the lease it runs on now


@dataclass(frozen=True)
class HomeMove:
    job_id: str
    leaving: str  # the lease
    to: str  # the owned cluster with room
    world_size: int  # what it would get there now

    @property
    def cause(self) -> str:
        return f"room on {self.to} (owned): leaving the lease on {self.leaving}"


def return_home_moves(
    away: Sequence[AwayRun],
    owned: Sequence[ClusterSnapshot],
    waiting: Sequence[JobRequest],
    now: float,
    moving_to: Collection[str] = (),
) -> list[HomeMove]:
    """One move per owned cluster at most, jobs in queue order, each to the first owned cluster
    in its preference order that would take it now and that neither a waiting job accepts nor
    a move in flight (`moving_to`: owned clusters some job is draining to go to) is headed for.
    Clusters in `owned` that are not owned are ignored."""
    homes = [c for c in owned if c.kind == OWNED]
    blocked = set(moving_to)
    for job in waiting:
        # A job that could never fit a cluster does not wait for it.
        blocked.update(
            c.name for c in accepted(job, homes) if c.devices_total >= job.world_sizes[0]
        )
    by_id = {run.request.job_id: run for run in away}
    moves: list[HomeMove] = []
    for request in queue_order(run.request for run in away):
        free_homes = [c for c in accepted(request, homes) if c.name not in blocked]
        if not free_homes:
            continue
        # Running now, so a back-off from earlier failed starts no longer applies.
        here = dataclasses.replace(
            request, clusters=tuple(c.name for c in free_homes), not_before=0.0
        )
        decision = place([here], free_homes, now)[0]
        if isinstance(decision, Placement):
            leaving = by_id[request.job_id].cluster
            moves.append(HomeMove(request.job_id, leaving, decision.cluster, decision.world_size))
            blocked.add(decision.cluster)
    return moves
