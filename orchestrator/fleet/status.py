"""One row per cluster: reachable, devices used and free, lease left, cost, running jobs."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from orchestrator.fleet.fleet import ClusterView
from orchestrator.fleet.probe import ClusterHealth, probe
from orchestrator.fleet.tokens import auth_headers


@dataclass(frozen=True)
class ClusterStatus:
    name: str
    kind: str
    device_type: str
    reachable: bool
    error: str | None
    devices_total: int
    devices_used: float | None
    devices_free: float | None
    lease_left_s: float | None
    cost_per_device_hour: float
    running_jobs: int | None
    dashboard_url: str | None

    def as_json(self) -> dict:
        return asdict(self)


def running_jobs(view: ClusterView, timeout_s: float = 5.0) -> int | None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(view.dashboard_url, headers=auth_headers(view.token))
        return sum(1 for j in client.list_jobs() if j.status == JobStatus.RUNNING)
    except Exception:  # the row already says whether the cluster is reachable
        return None


def cluster_status(view: ClusterView, now: float | None = None) -> ClusterStatus:
    now = time.time() if now is None else now
    health: ClusterHealth = probe(view)
    total = int(health.devices_total) if health.devices_total else view.devices
    free = None if health.devices_used is None else total - health.devices_used
    return ClusterStatus(
        name=view.name,
        kind=view.kind,
        device_type=view.device_type,
        reachable=health.reachable,
        error=health.error,
        devices_total=total,
        devices_used=health.devices_used,
        devices_free=free,
        lease_left_s=None if view.lease_end is None else view.lease_end - now,
        cost_per_device_hour=view.cost_per_device_hour,
        running_jobs=running_jobs(view) if health.reachable else None,
        dashboard_url=view.dashboard_url,
    )
