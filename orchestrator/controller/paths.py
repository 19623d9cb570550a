"""Where a job's files live under a cluster's storage root: one folder per job, shared by
its attempts on that cluster, with its checkpoints beside them."""

from __future__ import annotations

from orchestrator.fleet.fleet import ClusterView
from orchestrator.rundir import RunDir


def job_root(cluster: ClusterView, job_id: str) -> str:
    return f"{cluster.storage_root.rstrip('/')}/jobs/{job_id}"


def attempt_dir(cluster: ClusterView, job_id: str, attempt: int) -> str:
    return f"{job_root(cluster, job_id)}/attempt-{attempt}"


def checkpoints_url(cluster: ClusterView, job_id: str) -> str:
    return f"{job_root(cluster, job_id)}/checkpoints"


def fence_url(cluster: ClusterView, job_id: str) -> str:
    """The job's fence on this cluster: the newest epoch, which alone may commit here."""
    return f"{job_root(cluster, job_id)}/fence.json"


def run_files(cluster: ClusterView, job_id: str, attempt: int) -> RunDir:
    """The attempt's run files, opened with the cluster's storage options."""
    return RunDir(attempt_dir(cluster, job_id, attempt), cluster.storage_options)
