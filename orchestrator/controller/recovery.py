"""How an attempt ended, and where the job goes next: the named recovery strategies.

Pure functions of what the controller observed, so every rule is tested without a cluster.
Infrastructure (a rank or driver died, storage or a collective failed, the cluster was lost, a
drain was ignored, someone else stopped the job) sends the job back to the queue to resume from
its last committed checkpoint, on the clusters its strategy names, until it has used up
`placement.max_restarts`. Only an exit code the user marked as the job's own error fails it at
once, since another attempt would fail the same way, and only when the cluster was healthy
when the attempt ended: on a cluster that lost a node or stopped answering, a "user error" may
be what the failure looked like from a surviving rank. A cluster whose Python cannot run
Spillway is at fault itself: the job leaves it as it would leave a lost cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from orchestrator import exit_codes


class Outcome(str, Enum):
    SUCCEEDED = "SUCCEEDED"
    DRAINED = "DRAINED"  # checkpointed and stopped on request
    FENCED = "FENCED"  # a newer attempt exists: this one stopped before committing anything
    CANCELLED = "CANCELLED"  # Ray says STOPPED and the controller stopped it
    NO_CAPACITY = "NO_CAPACITY"  # the gang could not be reserved: just queue again
    # An exit code in placement.user_error_exit_codes, on a healthy cluster: no retry.
    USER_ERROR = "USER_ERROR"
    # The cluster's Python lacks what Spillway needs: recover elsewhere, as from a lost cluster.
    BROKEN_CLUSTER = "BROKEN_CLUSTER"
    INFRASTRUCTURE = "INFRASTRUCTURE"  # anything else: recover from the last committed checkpoint


def classify(
    status: str,
    exit_code: int | None,
    user_error_exit_codes: list[int],
    cluster_healthy: bool,
    stopped_by_us: bool = False,
) -> Outcome:
    """What a finished Ray job (status SUCCEEDED, FAILED or STOPPED) means for the job.

    `cluster_healthy`: the cluster answered and had all its nodes when the end was observed;
    `stopped_by_us`: the controller asked Ray to stop this job (a cancel, a zombie it fenced).
    """
    if status == "SUCCEEDED":
        return Outcome.SUCCEEDED
    if status == "STOPPED" and stopped_by_us:
        return Outcome.CANCELLED
    if exit_code == exit_codes.DRAINED:  # a SIGTERM from outside drains too: nothing was lost
        return Outcome.DRAINED
    if exit_code == exit_codes.FENCED:
        return Outcome.FENCED
    if exit_code == exit_codes.NO_CAPACITY:
        return Outcome.NO_CAPACITY
    if status != "FAILED" or exit_code is None:
        # Stopped by someone other than us, or a supervisor that died without an exit code.
        return Outcome.INFRASTRUCTURE
    if exit_code == exit_codes.BROKEN_ENVIRONMENT:
        return Outcome.BROKEN_CLUSTER
    users = (
        exit_code in user_error_exit_codes
        and exit_code >= 1  # a negative code is a signal: the driver was killed
        and exit_code not in exit_codes.RESERVED  # validate refuses these in the list too
    )
    if users and cluster_healthy:
        return Outcome.USER_ERROR
    # A rank lost (69), infrastructure (74), a signal, or a user's code on a cluster that was
    # not healthy: none of them is known to be the job's own fault.
    return Outcome.INFRASTRUCTURE


def skips_retries(outcome: Outcome) -> bool:
    """Whether the job fails at once, with restarts left: only for the user's own error."""
    return outcome is Outcome.USER_ERROR


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
