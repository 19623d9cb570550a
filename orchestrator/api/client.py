"""The CLI's side of the controller's API: one request per call, each with a timeout, and every
failure as one line a person can act on (ApiError's text).

The token is checked before anything is sent: a plain-http URL to a host that is not loopback
is refused unless the endpoint says insecure_http, and redirects are never followed (they
would carry the token elsewhere).
"""

from __future__ import annotations

import ipaddress
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from orchestrator.api.protocol import PREFIX
from orchestrator.fleet.tokens import read_token

TIMEOUT_S = 30.0  # above the server's own lock wait, so a busy answer arrives as one
HEALTH_TIMEOUT_S = 5.0


class ApiError(Exception):
    """One line for the user; the CLI prints it and exits 2."""


class Unreachable(ApiError):
    """No answer: refused, timed out, or a gateway's 502/503/504. Worth retrying."""


class Unauthorized(ApiError):
    pass


class Rejected(ApiError):
    """The controller understood and said no (400, 404, 409)."""

    def __init__(self, message: str, status: int, key: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.key = key


class ServerFailed(ApiError):
    pass


@dataclass(frozen=True)
class Endpoint:
    """Where a controller's API is and where its token comes from (never the token itself)."""

    url: str
    token_path: str | None = None
    token_env: str | None = None
    insecure_http: bool = False
    fleet: str | None = None
    source: str = "the fleet config"  # where this endpoint was found, for messages

    def token_source(self) -> str:
        parts = []
        if self.token_env:
            parts.append(f"${self.token_env}")
        if self.token_path:
            parts.append(self.token_path)
        return " or ".join(parts) or "no token_path or token_env"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport(endpoint: Endpoint) -> None:
    """Refuse, before sending anything, a URL that would expose the token."""
    parts = urllib.parse.urlsplit(endpoint.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(
            f"controller url '{endpoint.url}' (from {endpoint.source}) is not an http(s) URL "
            "(allowed: http://HOST:PORT or https://HOST[:PORT])"
        )
    if parts.scheme == "http" and not is_loopback(parts.hostname) and not endpoint.insecure_http:
        raise ApiError(
            f"refusing to send the controller's token over plain http to {parts.hostname} "
            f"({endpoint.url}, from {endpoint.source}): use https, or set insecure_http: true "
            "there if the network in between is trusted"
        )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001
        return None  # urllib then raises HTTPError with the 3xx status


class ApiClient:
    def __init__(self, endpoint: Endpoint, timeout_s: float = TIMEOUT_S) -> None:
        check_transport(endpoint)
        token = read_token(endpoint.token_path, endpoint.token_env)
        if not token:
            raise ApiError(
                f"no token for the controller at {endpoint.url}: {endpoint.token_source()} "
                f"(from {endpoint.source}) is missing or empty"
            )
        self.endpoint = endpoint
        self.url = endpoint.url.rstrip("/")
        self.timeout_s = timeout_s
        self._token = token
        host = urllib.parse.urlsplit(endpoint.url).hostname or ""
        # Loopback never goes through a proxy from the environment; a remote home may need one.
        proxies = urllib.request.ProxyHandler({} if is_loopback(host) else None)
        self._opener = urllib.request.build_opener(proxies, _NoRedirect)

    # ---- one request --------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> dict:
        url = f"{self.url}{PREFIX}{path}"
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self._token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            with self._opener.open(req, timeout=timeout) as response:
                return self._decode(response.status, response.read())
        except urllib.error.HTTPError as exc:
            raise self._failure(exc.code, exc.read()) from None
        except urllib.error.URLError as exc:
            raise self._unreachable(exc.reason) from None
        except TimeoutError:
            raise self._unreachable(f"no answer within {timeout:.0f}s") from None
        except (ConnectionError, OSError) as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, reason: object) -> Unreachable:
        if isinstance(reason, TimeoutError):
            reason = "no answer in time"
        return Unreachable(f"cannot reach the controller at {self.url} ({reason})")

    def _decode(self, status: int, raw: bytes) -> dict:
        try:
            value = json.loads(raw)
        except ValueError:
            raise ServerFailed(
                f"the controller at {self.url} answered {status} with no JSON"
            ) from None
        if not isinstance(value, dict):
            raise ServerFailed(f"the controller at {self.url} answered {status} with no object")
        return value

    def _failure(self, status: int, raw: bytes) -> ApiError:
        try:
            error = json.loads(raw).get("error") or {}
            message, key = str(error.get("message")), error.get("key")
        except (ValueError, AttributeError):
            message, key = f"HTTP {status}", None
        if status == 401:
            return Unauthorized(
                f"the controller at {self.url} refused the token ({status}) from "
                f"{self.endpoint.token_source()} (found through {self.endpoint.source}); "
                "it must be the controller's own (fleet.controller.token_path or token_env)"
            )
        if status in (400, 404, 409):
            return Rejected(message, status, key)
        if status in (502, 503, 504):
            return Unreachable(f"the controller at {self.url} could not answer: {message}")
        return ServerFailed(f"the controller at {self.url} failed ({status}): {message}")

    # ---- the routes ---------------------------------------------------------------------

    def health(self, timeout_s: float = HEALTH_TIMEOUT_S) -> dict:
        return self.request("GET", "/health", timeout_s=timeout_s)

    def jobs(self) -> list[dict]:
        return self.request("GET", "/jobs")["jobs"]

    def submit(self, run_config: dict, overrides: list[str]) -> str:
        body = {"run_config": run_config, "overrides": overrides}
        return self.request("POST", "/jobs", body)["job_id"]

    def job(self, job_id: str) -> dict:
        return self.request("GET", f"/jobs/{_quote(job_id)}")

    def progress(self, job_id: str) -> dict:
        return self.request("GET", f"/jobs/{_quote(job_id)}/progress")

    def metrics(self, job_id: str) -> list[dict]:
        return self.request("GET", f"/jobs/{_quote(job_id)}/metrics")["metrics"]

    def logs(
        self, job_id: str, attempt: int | None = None, offset: int = 0, only: int | None = None
    ) -> dict:
        query = {"attempt": attempt, "offset": offset, "only": only}
        return self.request("GET", f"/jobs/{_quote(job_id)}/logs", query=query)

    def cancel(self, job_id: str) -> dict:
        return self.request("POST", f"/jobs/{_quote(job_id)}/cancel", {})

    def resume(self, job_id: str, run_config: dict, overrides: list[str]) -> dict:
        body = {"run_config": run_config, "overrides": overrides}
        return self.request("POST", f"/jobs/{_quote(job_id)}/resume", body)

    def migrate(self, job_id: str, to: str) -> dict:
        return self.request("POST", f"/jobs/{_quote(job_id)}/migrate", {"to": to})


def _quote(job_id: str) -> str:
    return urllib.parse.quote(job_id, safe="")
