"""Ask a cluster, through its dashboard and with its token, whether it is up and how full."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass

from orchestrator.fleet.fleet import ClusterView
from orchestrator.fleet.tokens import auth_headers


@dataclass(frozen=True)
class ClusterHealth:
    reachable: bool
    devices_used: float | None = None
    devices_total: float | None = None
    error: str | None = None


def _get(view: ClusterView, path: str, timeout_s: float) -> dict:
    req = urllib.request.Request(view.dashboard_url + path, headers=auth_headers(view.token))
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def probe(view: ClusterView, timeout_s: float = 2.0) -> ClusterHealth:
    if view.local and not view.running:
        return ClusterHealth(False, error="not running: spillway fleet up")
    if not view.dashboard_url:
        return ClusterHealth(False, error="no dashboard_url")
    try:
        status = _get(view, "/api/cluster_status", timeout_s)["data"]["autoscalingStatus"]
    except urllib.error.HTTPError as exc:
        reason = "token refused" if exc.code in (401, 403) else f"HTTP {exc.code}"
        return ClusterHealth(False, error=reason)
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        return ClusterHealth(False, error=f"unreachable: {getattr(exc, 'reason', exc)}")
    # The autoscaler's summary line keeps Ray's own resource names, e.g. "0.0/2.0 spillway_device";
    # in the first seconds after a start it has not reported yet.
    usage = re.search(rf"([\d.]+)/([\d.]+) {re.escape(view.device_resource)}\b", status or "")
    if usage is None:
        return ClusterHealth(True)
    return ClusterHealth(True, float(usage.group(1)), float(usage.group(2)))
