"""The placement policy's inputs and outputs: frozen values, checked once when built.

The checks here are the ones the policy's guarantees lean on (a free count above the total
or a negative cost rate would let it oversubscribe or bust a budget), so a bad snapshot fails
where it is made rather than as a wrong decision later.
"""

from __future__ import annotations

from dataclasses import dataclass, field

OWNED = "owned"
LEASED = "leased"


@dataclass(frozen=True)
class JobRequest:
    job_id: str
    world_sizes: tuple[int, ...]  # allowed world sizes, strictly ascending, non-empty
    device_types: tuple[str, ...] = ()  # accepted, most preferred first; () = any
    clusters: tuple[str, ...] = ()  # accepted, most preferred first; () = whole fleet
    priority: int = 0  # higher first
    submitted_at: float = 0.0  # FIFO among equal priority, then job_id
    waiting_since: float = 0.0  # when it last became PENDING (for spill_after_s)
    budget: float | None = None  # max total cost of the whole job; None = unlimited
    cost_so_far: float = 0.0
    expected_remaining_s: float | None = None  # remaining run time, if known
    spill_after_s: float = 0.0  # wait at least this long for owned capacity before a lease
    min_lease_left_s: float = 0.0  # never place on a lease with less time left than this
    not_before: float = 0.0  # backing off: no placement before this time (see backoff.py)
    failures: int = 0  # attempts in a row that could not start; names the back-off in its reason

    def __post_init__(self) -> None:
        # Callers build these from config lists; tuples keep the value hashable and frozen.
        for name in ("world_sizes", "device_types", "clusters"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        sizes = self.world_sizes
        if not sizes or sizes[0] < 1 or sizes != tuple(sorted(set(sizes))):
            raise ValueError(
                f"job {self.job_id}: world_sizes must be positive and strictly ascending, "
                f"got {sizes}"
            )
        if self.failures < 0:
            raise ValueError(f"job {self.job_id}: failures must be >= 0, got {self.failures}")


@dataclass(frozen=True)
class ClusterSnapshot:
    name: str
    kind: str  # OWNED or LEASED
    device_type: str
    devices_total: int
    devices_free: int
    cost_per_device_hour: float
    lease_start: float | None = None  # epoch seconds, leased only
    lease_end: float | None = None
    reachable: bool = True

    def __post_init__(self) -> None:
        if self.kind not in (OWNED, LEASED):
            raise ValueError(
                f"cluster {self.name}: kind must be owned or leased, got {self.kind!r}"
            )
        if not 0 <= self.devices_free <= self.devices_total:
            raise ValueError(
                f"cluster {self.name}: devices_free {self.devices_free} is not within "
                f"0..devices_total {self.devices_total}"
            )
        if self.cost_per_device_hour < 0:
            raise ValueError(f"cluster {self.name}: cost_per_device_hour is negative")
        if self.kind == LEASED and (self.lease_start is None or self.lease_end is None):
            raise ValueError(
                f"cluster {self.name}: a leased cluster needs lease_start and lease_end"
            )


def cluster_snapshot(
    name: str,
    cluster,
    devices_used: int = 0,
    lease: tuple[float, float] | None = None,
    reachable: bool = True,
) -> ClusterSnapshot:
    """The one way a cluster becomes the policy's input, at launch (the fleet file: whole,
    free, inside an endless lease) and in the controller (its devices in use, its lease,
    whether it answers). `cluster`: a fleet entry or a ClusterView (kind, device_type,
    devices, cost_per_device_hour). `lease` is ignored for an owned cluster; a leased one
    without it is taken as leased for ever (what launch-time checks assume)."""
    leased = cluster.kind == LEASED
    start, end = (lease or (0.0, float("inf"))) if leased else (None, None)
    return ClusterSnapshot(
        name=name,
        kind=cluster.kind,
        device_type=cluster.device_type,
        devices_total=cluster.devices,
        devices_free=max(0, cluster.devices - devices_used),
        cost_per_device_hour=cluster.cost_per_device_hour,
        lease_start=start,
        lease_end=end,
        reachable=reachable,
    )


@dataclass(frozen=True)
class Placement:
    job_id: str
    cluster: str
    world_size: int
    projected_cost: float  # currency units, by the rule in policy.place


Detail = dict[str, float | int | str]


@dataclass(frozen=True)
class Wait:
    job_id: str
    # One human-readable line naming the blocking fact. It holds no number that moves while the
    # fact holds (free devices, seconds left, cost): the same blocker gives the same text tick
    # after tick, so a change of text is an event worth recording.
    reason: str
    detail: Detail = field(default_factory=dict)  # the live numbers behind `reason`
    # The cluster whose free devices this job, first in the queue to wait for devices alone,
    # holds against jobs of lower priority (see policy.place); None for every other Wait.
    holds: str | None = None


Decision = Placement | Wait
