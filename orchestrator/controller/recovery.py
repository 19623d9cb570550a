"""How an attempt ended, and where the job goes next: the named recovery strategies.

Pure functions of what the controller observed, so every rule is tested without a cluster.
A fault (a rank or driver died, the cluster was lost, a drain was ignored) sends the job back
to the queue to resume from its last committed checkpoint, on the clusters its strategy names,
until it has used up `placement.max_restarts`. An exit code the user marked as the job's own
error fails it at once: another attempt would fail the same way. A cluster whose Python cannot
run Spillway is at fault itself: the job leaves it as it would leave a lost cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from orchestrator import exit_codes


class Outcome(str, Enum):
    SUCCEEDED = "SUCCEEDED"
    DRAINED = "DRAINED"  # checkpointed and stopped on request
    NO_CAPACITY = "NO_CAPACITY"  # the gang could not be reserved: just queue again
    USER_ERROR = "USER_ERROR"  # an exit code in placement.user_error_exit_codes
    # The cluster's Python lacks what Spillway needs: recover elsewhere, as from a lost cluster.
    BROKEN_CLUSTER = "BROKEN_CLUSTER"
    FAULT = "FAULT"  # anything else: recover from the last committed checkpoint


def classify(status: str, exit_code: int | None, user_error_exit_codes: list[int]) -> Outcome:
    """What a finished Ray job (status SUCCEEDED, FAILED or STOPPED) means for the job."""
    if status == "SUCCEEDED":
        return Outcome.SUCCEEDED
    if exit_code == exit_codes.DRAINED:
        return Outcome.DRAINED
    if exit_code == exit_codes.NO_CAPACITY:
        return Outcome.NO_CAPACITY
    if status == "FAILED" and exit_code == exit_codes.BROKEN_ENVIRONMENT:
        return Outcome.BROKEN_CLUSTER
    if status == "FAILED" and exit_code in user_error_exit_codes:
        return Outcome.USER_ERROR
    # A rank lost (69), a driver killed by a signal (negative), a job stopped by someone
    # other than us, a supervisor that died: none of them is the job's own fault.
    return Outcome.FAULT


def cluster_at_fault(outcome: Outcome) -> bool:
    """Whether recovery should leave the cluster as if it were lost: restarting there (or
    coming back to it first) would meet the same broken environment."""
    return outcome is Outcome.BROKEN_CLUSTER


class Restart:
    """Same cluster, from the last committed checkpoint; a lost cluster falls over instead."""

    name = "restart"

    def next_clusters(self, failed: str, order: list[str], cluster_lost: bool) -> list[str]:
        if cluster_lost:
            return Failover().next_clusters(failed, order, cluster_lost)
        return [failed]


class Failover:
    """The clusters after the failed one in fleet order, wrapping round; it comes last, and
    not at all when it was lost."""

    name = "failover"

    def next_clusters(self, failed: str, order: list[str], cluster_lost: bool) -> list[str]:
        if failed not in order:
            return list(order)
        i = order.index(failed)
        return order[i + 1 :] + order[:i] + ([] if cluster_lost else [failed])


STRATEGIES = {s.name: s for s in (Restart(), Failover())}


@dataclass(frozen=True)
class Recovery:
    give_up: bool  # the job FAILED: it has used up its restarts
    next_clusters: list[str]
    cause: str


def recover(
    strategy: str,
    failed: str,
    order: list[str],
    cluster_lost: bool,
    restarts: int,
    max_restarts: int,
    what: str,
) -> Recovery:
    """After a fault described by `what`; `restarts` counts this one."""
    if restarts > max_restarts:
        return Recovery(True, [], f"{what}; gave up after {max_restarts} restart(s)")
    clusters = STRATEGIES[strategy].next_clusters(failed, order, cluster_lost)
    where = clusters[0] if len(clusters) == 1 else f"first of {', '.join(clusters)}"
    return Recovery(
        False,
        clusters,
        f"{what}; {strategy} {restarts}/{max_restarts} on {where} from the last committed checkpoint",
    )
