"""The controller's HTTP API: aiohttp on a thread and event loop of its own, beside the
reconcile loop, in the controller's process.

Every route needs `Authorization: Bearer <token>` (the health check too: an unauthenticated
caller learns nothing, not even which fleet this is). Handlers never touch the state on the
event loop: state reads and writes run in one thread pool, reads of clusters (metrics, logs) in
another, so a slow cluster cannot starve `status`. Writes (launch, cancel, resume, migrate) take
the controller's lock, so they never land inside a reconcile decision, and wake the loop after.
Reads take no lock: each is a consistent SQLite read, and a long tick must not stall `wait`.

    GET  /v1/health                    {fleet, pid, started_at}
    GET  /v1/jobs                      {jobs: [...]}
    POST /v1/jobs                      {run_config, overrides} -> 201 {job_id}
    GET  /v1/jobs/{id}                 attempts, checkpoints, events (status --json)
    GET  /v1/jobs/{id}/progress        state, reason, max_steps, step, loss, cluster, copy
    GET  /v1/jobs/{id}/metrics         {metrics: [...]}
    GET  /v1/jobs/{id}/logs            ?attempt=N&offset=M (or ?only=N) -> {attempt, text, offset, done}
    POST /v1/jobs/{id}/cancel
    POST /v1/jobs/{id}/resume          {run_config, overrides}
    POST /v1/jobs/{id}/migrate         {to}
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from orchestrator.api import actions, views
from orchestrator.api.problems import ApiProblem, BadRequest, Busy
from orchestrator.api.protocol import PREFIX, error_body
from orchestrator.controller.controller import Controller

log = logging.getLogger("spillway.api")

# A write waits this long for the reconcile loop to let go of the lock, then gives up unapplied.
LOCK_WAIT_S = 15.0
# A handler's whole work, as a backstop behind every bounded call beneath it.
HANDLER_TIMEOUT_S = 60.0
START_TIMEOUT_S = 30.0


def _error(status: int, message: str, key: str | None = None) -> web.Response:
    response = web.json_response(error_body(status, message, key), status=status)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="spillway"'
    return response


def _authorized(request: web.Request, token: str) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


class ApiServer:
    def __init__(
        self,
        controller: Controller,
        token: str,
        host: str,
        port: int,
        wake: Callable[[], None],
        health: dict[str, Any],
    ) -> None:
        if not token:
            raise ValueError("the API needs a token: it never serves unauthenticated")
        self.controller = controller
        self.host, self.port = host, port
        self._token = token
        self._wake = wake
        self._health = dict(health)
        self._state_pool = ThreadPoolExecutor(4, thread_name_prefix="api-state")
        self._cluster_pool = ThreadPoolExecutor(4, thread_name_prefix="api-cluster")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ---- running it ---------------------------------------------------------------------

    def start(self) -> None:
        """Listen, or raise why not (a port taken, a host that is not ours)."""
        self._thread = threading.Thread(target=self._run, name="api", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise RuntimeError(f"the API did not start on {self.url} within {START_TIMEOUT_S}s")
        if self._failure is not None:
            raise RuntimeError(f"the API cannot listen on {self.url}: {self._failure}")
        log.info("API listening on %s", self.url)

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        runner = web.AppRunner(self.app(), access_log=None)
        try:
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, self.host, self.port).start())
            if self.port == 0:
                self.port = runner.addresses[0][1]
        except BaseException as exc:  # reported by start() in the caller's thread
            self._failure = exc
            loop.run_until_complete(runner.cleanup())
            loop.close()
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_s)
        self._state_pool.shutdown(wait=False, cancel_futures=True)
        self._cluster_pool.shutdown(wait=False, cancel_futures=True)

    # ---- the application ----------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        r, jobs = app.router, f"{PREFIX}/jobs"
        r.add_get(f"{PREFIX}/health", self._get_health)
        r.add_get(jobs, self._list_jobs)
        r.add_post(jobs, self._submit)
        r.add_get(jobs + "/{job_id}", self._get_job)
        r.add_get(jobs + "/{job_id}/progress", self._progress)
        r.add_get(jobs + "/{job_id}/metrics", self._metrics)
        r.add_get(jobs + "/{job_id}/logs", self._logs)
        r.add_post(jobs + "/{job_id}/cancel", self._cancel)
        r.add_post(jobs + "/{job_id}/resume", self._resume)
        r.add_post(jobs + "/{job_id}/migrate", self._migrate)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        """Auth first, then one JSON error body for whatever goes wrong."""
        if not _authorized(request, self._token):
            return _error(401, "missing or wrong bearer token")
        try:
            return await handler(request)
        except ApiProblem as problem:
            return _error(problem.status, problem.message, problem.key)
        except web.HTTPException as exc:  # no such route, wrong method
            return _error(exc.status, f"{request.method} {request.path}: {exc.reason}")
        except asyncio.TimeoutError:
            return _error(504, f"the controller did not finish within {HANDLER_TIMEOUT_S:.0f}s")
        except Exception as exc:
            log.exception("%s %s failed", request.method, request.path)
            return _error(500, f"the controller failed: {type(exc).__name__}: {exc}")

    async def _in(self, pool: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.run_in_executor(pool, fn, *args), HANDLER_TIMEOUT_S)

    def _locked(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A write, in the lock, then the loop woken; never left waiting behind the loop."""
        if not self.controller.lock.acquire(timeout=LOCK_WAIT_S):
            raise Busy(
                f"the reconcile loop held the controller for over {LOCK_WAIT_S:.0f}s; "
                "nothing was changed, try again"
            )
        try:
            result = fn(self.controller, *args)
        finally:
            self.controller.lock.release()
        self._wake()
        return result

    async def _write(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self._in(self._state_pool, self._locked, fn, *args)

    @staticmethod
    async def _body(request: web.Request) -> Any:
        try:
            return json.loads(await request.read() or b"{}")
        except ValueError:
            raise BadRequest("body: not JSON", key="body") from None

    # ---- routes -------------------------------------------------------------------------

    async def _get_health(self, request: web.Request) -> web.Response:
        return web.json_response(self._health)

    async def _list_jobs(self, request: web.Request) -> web.Response:
        return web.json_response(
            await self._in(self._state_pool, views.jobs_json, self.controller.state)
        )

    async def _submit(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        return web.json_response(await self._write(actions.submit, body), status=201)

    async def _get_job(self, request: web.Request) -> web.Response:
        job_id, state = request.match_info["job_id"], self.controller.state

        def read() -> dict:
            return views.job_json(state, views.require_job(state, job_id), detail=True)

        return web.json_response(await self._in(self._state_pool, read))

    async def _progress(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        return web.json_response(
            await self._in(self._cluster_pool, views.progress_json, self.controller, job_id)
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        return web.json_response(
            await self._in(self._cluster_pool, views.metrics_json, self.controller, job_id)
        )

    async def _logs(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        try:
            attempt = int(request.query["attempt"]) if "attempt" in request.query else None
            offset = int(request.query.get("offset", "0"))
            only = int(request.query["only"]) if "only" in request.query else None
        except ValueError:
            raise BadRequest(
                "attempt, offset and only: must be whole numbers", key="offset"
            ) from None
        return web.json_response(
            await self._in(
                self._cluster_pool, views.logs_json, self.controller, job_id, attempt, offset, only
            )
        )

    async def _cancel(self, request: web.Request) -> web.Response:
        return web.json_response(await self._write(actions.cancel, request.match_info["job_id"]))

    async def _resume(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        return web.json_response(
            await self._write(actions.resume, request.match_info["job_id"], body)
        )

    async def _migrate(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        return web.json_response(
            await self._write(actions.migrate, request.match_info["job_id"], body)
        )
