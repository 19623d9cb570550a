"""One cluster through the Ray Jobs API, authenticated with that cluster's own token."""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from ray.job_submission import JobSubmissionClient

from orchestrator.backends.base import BackendError, JobInfo, submission_id
from orchestrator.fleet.fleet import ClusterView
from orchestrator.fleet.tokens import auth_headers
from orchestrator.runtime.spec import SPEC_ENV, AttemptSpec

# Spillway's own packages, shipped with every attempt: the cluster runs this code, not
# whatever Spillway it may have installed.
SHIPPED_PACKAGES = ("orchestrator", "recipes")
# Gitignore-style patterns, as Ray matches them (a directory without its slash): byte code
# and build leftovers stay home.
SHIPPED_EXCLUDES = ["__pycache__", "*.pyc", "*.pyo", "*.egg-info", ".pytest_cache"]
# Every HTTP request to a cluster's Jobs API: connecting, then the answer (the code upload of
# a submit included).
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 30.0

T = TypeVar("T")


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

    timeout_s: tuple[float, float] = (CONNECT_TIMEOUT_S, REQUEST_TIMEOUT_S)

    def _do_request(self, method: str, endpoint: str, **kwargs):
        kwargs.setdefault("timeout", self.timeout_s)
        return super()._do_request(method, endpoint, **kwargs)


def _refused(exc: BaseException) -> bool:
    """Nothing listens at the address: the head is gone, not slow."""
    while exc is not None:
        if isinstance(exc, ConnectionRefusedError):
            return True
        if "Connection refused" in str(exc) or "Errno 111" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _timed_out(exc: BaseException) -> bool:
    import requests

    return isinstance(exc, (requests.exceptions.Timeout, TimeoutError))


class RayJobsBackend:
    """ClusterBackend (backends.base) through the cluster's Ray Jobs API; every call raises
    BackendError within its timeout."""

    def __init__(self, cluster: ClusterView) -> None:
        self.cluster = cluster
        self._client: BoundedJobSubmissionClient | None = None

    @property
    def client(self) -> BoundedJobSubmissionClient:
        # Made on first use: making one is an HTTP round trip (Ray checks the version).
        if self._client is None:
            self._client = self._call(
                "connect",
                lambda: BoundedJobSubmissionClient(
                    self.cluster.dashboard_url, headers=auth_headers(self.cluster.token)
                ),
            )
        return self._client

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(
                f"{what} on {self.cluster.name} ({self.cluster.dashboard_url}) failed: "
                f"{type(exc).__name__}: {exc}",
                refused=_refused(exc),
                timed_out=_timed_out(exc),
            ) from exc

    def submit(self, spec: AttemptSpec) -> str:
        # A local cluster shares this machine's interpreter; a remote one brings its own.
        python = sys.executable if self.cluster.local else "python"
        return self._call(
            "submit",
            lambda: self.client.submit_job(
                entrypoint=f"{python} -m orchestrator.runtime.driver",
                submission_id=submission_id(spec.job_id, spec.attempt),
                runtime_env=runtime_env(spec),
                metadata={"spillway_job": spec.job_id, "attempt": str(spec.attempt)},
            ),
        )

    def info(self, ray_job_id: str) -> JobInfo:
        found = self._call("job info", lambda: self.client.get_job_info(ray_job_id))
        return JobInfo(
            status=str(found.status),
            exit_code=exit_code_of(getattr(found, "driver_exit_code", None), found.message),
            message=found.message or "",
        )

    def status(self, ray_job_id: str) -> str:
        return self.info(ray_job_id).status

    def list(self) -> list[str]:
        jobs = self._call("list jobs", lambda: self.client.list_jobs())
        return [j.submission_id for j in jobs if j.submission_id]

    def exists(self, ray_job_id: str) -> bool:
        return ray_job_id in self.list()

    def logs(self, ray_job_id: str) -> str:
        return self._call("logs", lambda: self.client.get_job_logs(ray_job_id))

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
        return self._call("stop", lambda: self.client.stop_job(ray_job_id))


_EXIT_CODE = re.compile(r"exit code (-?\d+)")


def exit_code_of(driver_exit_code: int | None, message: str | None) -> int | None:
    """The driver's exit code, from the Jobs API field or, on older Ray, its message."""
    if driver_exit_code is not None:
        return driver_exit_code
    found = _EXIT_CODE.search(message or "")
    return int(found.group(1)) if found else None
