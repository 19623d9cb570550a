"""One cluster through the Ray Jobs API, authenticated with that cluster's own token."""

from __future__ import annotations

import sys
from collections.abc import Iterator

from ray.job_submission import JobStatus, JobSubmissionClient

from orchestrator.fleet.fleet import ClusterView
from orchestrator.fleet.tokens import auth_headers
from orchestrator.runtime.spec import SPEC_ENV, AttemptSpec


def submission_id(job_id: str, attempt: int) -> str:
    """Deterministic, so a controller that restarts mid-submit cannot submit an attempt twice."""
    return f"{job_id}-a{attempt}"


class RayJobsBackend:
    def __init__(self, cluster: ClusterView) -> None:
        self.cluster = cluster
        self.client = JobSubmissionClient(
            cluster.dashboard_url, headers=auth_headers(cluster.token)
        )

    def submit(self, spec: AttemptSpec) -> str:
        # A local cluster shares this machine's interpreter; a remote one brings its own.
        python = sys.executable if self.cluster.local else "python"
        return self.client.submit_job(
            entrypoint=f"{python} -m orchestrator.runtime.driver",
            submission_id=submission_id(spec.job_id, spec.attempt),
            runtime_env={"env_vars": {SPEC_ENV: spec.to_json()}},
            metadata={"spillway_job": spec.job_id, "attempt": str(spec.attempt)},
        )

    def status(self, ray_job_id: str) -> JobStatus:
        return self.client.get_job_status(ray_job_id)

    def exists(self, ray_job_id: str) -> bool:
        return any(j.submission_id == ray_job_id for j in self.client.list_jobs())

    def logs(self, ray_job_id: str) -> str:
        return self.client.get_job_logs(ray_job_id)

    def follow_logs(self, ray_job_id: str) -> Iterator[str]:
        import asyncio

        async def collect():
            async for chunk in self.client.tail_job_logs(ray_job_id):
                yield chunk

        agen = collect()
        loop = asyncio.new_event_loop()
        try:
            while True:
                try:
                    yield loop.run_until_complete(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            loop.close()

    def stop(self, ray_job_id: str) -> bool:
        return self.client.stop_job(ray_job_id)
