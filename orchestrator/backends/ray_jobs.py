"""One cluster through the Ray Jobs API, authenticated with that cluster's own token."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from typing import Any

from ray.job_submission import JobStatus, JobSubmissionClient

from orchestrator.fleet.fleet import ClusterView
from orchestrator.fleet.tokens import auth_headers
from orchestrator.runtime.spec import SPEC_ENV, AttemptSpec

# Spillway's own packages, shipped with every attempt: the cluster runs this code, not
# whatever Spillway it may have installed.
SHIPPED_PACKAGES = ("orchestrator", "recipes")
# Gitignore-style patterns, as Ray matches them (a directory without its slash): byte code
# and build leftovers stay home.
SHIPPED_EXCLUDES = ["__pycache__", "*.pyc", "*.pyo", "*.egg-info", ".pytest_cache"]
# Every HTTP request to a cluster's Jobs API, the code upload of a submit included.
REQUEST_TIMEOUT_S = 30.0


def submission_id(job_id: str, attempt: int) -> str:
    """Deterministic, so a controller that restarts mid-submit cannot submit an attempt twice."""
    return f"{job_id}-a{attempt}"


def package_dir(name: str) -> str:
    """Where an installed package's directory is, found without importing it (the controller
    never imports a recipe)."""
    found = importlib.util.find_spec(name)
    if found is None or not found.submodule_search_locations:
        raise RuntimeError(f"cannot ship Spillway's {name} package: it is not installed here")
    return list(found.submodule_search_locations)[0]


def runtime_env(spec: AttemptSpec) -> dict[str, Any]:
    """What an attempt's Ray job carries: Spillway's code and the attempt spec, nothing else
    of this process's environment (no tokens, no credentials). The rank actors inherit it."""
    return {
        "py_modules": [package_dir(name) for name in SHIPPED_PACKAGES],
        "excludes": list(SHIPPED_EXCLUDES),
        "env_vars": {SPEC_ENV: spec.to_json()},
    }


class BoundedJobSubmissionClient(JobSubmissionClient):
    """Ray's client makes its requests without a timeout: a cluster that accepts the
    connection and never answers would hang the controller's loop."""

    def _do_request(self, method: str, endpoint: str, **kwargs):
        kwargs.setdefault("timeout", REQUEST_TIMEOUT_S)
        return super()._do_request(method, endpoint, **kwargs)


class RayJobsBackend:
    def __init__(self, cluster: ClusterView) -> None:
        self.cluster = cluster
        self.client = BoundedJobSubmissionClient(
            cluster.dashboard_url, headers=auth_headers(cluster.token)
        )

    def submit(self, spec: AttemptSpec) -> str:
        # A local cluster shares this machine's interpreter; a remote one brings its own.
        python = sys.executable if self.cluster.local else "python"
        return self.client.submit_job(
            entrypoint=f"{python} -m orchestrator.runtime.driver",
            submission_id=submission_id(spec.job_id, spec.attempt),
            runtime_env=runtime_env(spec),
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
