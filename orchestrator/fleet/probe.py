"""Ask a cluster, through its dashboard and with its token, whether it is up and how full."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator.fleet.tokens import auth_headers

if TYPE_CHECKING:  # fleet.fleet waits on a fresh cluster through this module
    from orchestrator.fleet.fleet import ClusterView


@dataclass(frozen=True)
class ClusterHealth:
    reachable: bool
    devices_used: float | None = None
    devices_total: float | None = None
    error: str | None = None
    # Why it is unreachable: "refused" (nothing listens: the head is gone), "timeout" (it
    # accepted and did not answer: hung or partitioned), or "error" (anything else).
    failure: str | None = None


def failure_kind(exc: BaseException) -> str:
    """refused, timeout or error, for an exception from one call to a cluster."""
    seen: BaseException | None = exc
    while seen is not None:
        reason = getattr(seen, "reason", None)
        for cause in (seen, reason):
            if isinstance(cause, ConnectionRefusedError):
                return "refused"
            if isinstance(cause, (TimeoutError, socket.timeout)):
                return "timeout"
        if "timed out" in str(seen).lower():
            return "timeout"
        seen = seen.__cause__ or seen.__context__
    return "error"


def _get(dashboard_url: str, token: str | None, path: str, timeout_s: float) -> dict:
    req = urllib.request.Request(dashboard_url + path, headers=auth_headers(token))
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def probe(view: ClusterView, timeout_s: float = 2.0) -> ClusterHealth:
    if view.local and not view.running:
        return ClusterHealth(False, error="not running: spillway fleet up", failure="refused")
    if not view.dashboard_url:
        return ClusterHealth(False, error="no dashboard_url", failure="error")
    return device_usage(view.dashboard_url, view.token, view.device_resource, timeout_s)


def device_usage(
    dashboard_url: str, token: str | None, device_resource: str, timeout_s: float = 2.0
) -> ClusterHealth:
    """What the cluster's autoscaler summary says of `device_resource`, used and total."""
    try:
        path = "/api/cluster_status"
        status = _get(dashboard_url, token, path, timeout_s)["data"]["autoscalingStatus"]
    except urllib.error.HTTPError as exc:
        reason = "token refused" if exc.code in (401, 403) else f"HTTP {exc.code}"
        return ClusterHealth(False, error=reason, failure="error")
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        return ClusterHealth(
            False, error=f"unreachable: {getattr(exc, 'reason', exc)}", failure=failure_kind(exc)
        )
    # The autoscaler's summary line keeps Ray's own resource names, e.g. "0.0/2.0 spillway_device";
    # in the first seconds after a start it has not reported yet.
    usage = re.search(rf"([\d.]+)/([\d.]+) {re.escape(device_resource)}\b", status or "")
    if usage is None:
        return ClusterHealth(True)
    return ClusterHealth(True, float(usage.group(1)), float(usage.group(2)))


def wait_for_devices(
    name: str,
    dashboard_url: str,
    token: str | None,
    device_resource: str,
    devices: int,
    timeout_s: float = 60.0,
) -> None:
    """Block until cluster `name` reports all `devices`: a worker raylet is up seconds before
    the autoscaler's summary counts it, and a cluster that looks half its size misleads both
    `fleet status` and the policy."""
    deadline = time.monotonic() + timeout_s
    while True:
        health = device_usage(dashboard_url, token, device_resource)
        if health.devices_total is not None and health.devices_total >= devices:
            return
        if time.monotonic() > deadline:
            seen = health.error or f"{health.devices_total or 0:g} of them"
            raise RuntimeError(
                f"cluster {name} did not report its {devices} {device_resource} within "
                f"{timeout_s:g}s (last seen: {seen})"
            )
        time.sleep(0.5)
