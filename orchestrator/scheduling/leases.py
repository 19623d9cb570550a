"""The lease watch: which jobs on a lease to drain now so that their save ends before the
lease does. Pure: the controller passes the attempts, the lease ends and its clock reading.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class OnLease:
    """A RUNNING job's attempt on a leased cluster."""

    job_id: str
    cluster: str
    lease_drain_margin_s: float  # the job's placement.lease_drain_margin_s
    last_save_s: float = 0.0  # how long its last save took (0 before its first)


def lease_drains(
    attempts: Sequence[OnLease], lease_ends: Mapping[str, float], now: float
) -> list[tuple[str, str]]:
    """(job_id, cause) for each attempt whose lease ends within its margin plus its last save's
    seconds (the drain must leave time for one more save), in the order given. An attempt on
    a cluster with no entry in `lease_ends` is left alone."""
    drains = []
    for a in attempts:
        end = lease_ends.get(a.cluster)
        if end is None:
            continue
        left = end - now
        save_s = max(0.0, a.last_save_s)
        if left <= a.lease_drain_margin_s + save_s:
            cause = (
                f"lease on {a.cluster} ends in {max(0.0, left):.0f}s; draining to move on "
                f"(its save takes {save_s:.1f}s, margin {a.lease_drain_margin_s:.0f}s)"
            )
            drains.append((a.job_id, cause))
    return drains
