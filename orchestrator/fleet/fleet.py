"""The fleet as the controller sees it: each cluster resolved to an address, a token, a lease.

A local cluster's address, ports and token come from what `fleet up` recorded; a remote one's
from the config. Relative lease times count from the moment the fleet first came up, recorded
once so that status, policy and a restarted controller all agree on when a lease ends.

`fleet up` also starts the fleet's own S3 server when a local cluster keeps its storage there,
and starts an isolated cluster in a mount namespace that hides this machine's Spillway from it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from orchestrator.fleet.environment import base_env, controller_cluster, controller_env, s3_env
from orchestrator.fleet.isolation import isolation_decision, mount_plan
from orchestrator.fleet.leases import lease_window
from orchestrator.fleet.local import (
    LocalCluster,
    free_ports,
    namespace_refusal,
    start_local_cluster,
    stop_local_cluster,
)
from orchestrator.fleet.probe import wait_for_devices
from orchestrator.fleet.s3server import (
    S3Server,
    credentials_path,
    ensure_buckets,
    record_path,
    start_s3_server,
    stop_s3_server,
)
from orchestrator.fleet.storage_options import merge_storage_options, read_credentials
from orchestrator.fleet.tokens import read_token

# The S3 server's entry in what up() and down() return, beside the clusters'.
S3_SERVER = "s3-server"


@dataclass(frozen=True)
class ClusterView:
    name: str
    kind: str
    local: bool
    address: str | None
    dashboard_url: str | None
    token: str | None = field(repr=False)
    device_type: str
    devices: int
    device_resource: str
    storage_root: str
    cost_per_device_hour: float
    lease_start: float | None
    lease_end: float | None
    running: bool  # a local cluster's processes are alive (remote clusters: assumed)
    # fsspec options for storage_root, credentials included: never logged or stored.
    storage_options: dict = field(default_factory=dict, repr=False, compare=False)


def fleet_dir(state_dir: str, fleet_name: str) -> Path:
    return Path(state_dir) / "fleet" / fleet_name


def _anchor(fdir: Path, create: bool) -> float:
    """When this fleet first came up: what +30m style lease times count from."""
    path = fdir / "up_at"
    if path.exists():
        return float(path.read_text())
    now = time.time()
    if create:
        fdir.mkdir(parents=True, exist_ok=True)
        path.write_text(repr(now))
    return now


def _storage_options(name: str, c: DictConfig, server: S3Server | None) -> dict[str, Any]:
    """The cluster's storage options, credentials read from the source its config names.

    A local_s3 cluster reaches the fleet's S3 server at the endpoint `fleet up` recorded, with
    the keys it made unless the config names other ones; before `fleet up` there is neither."""
    public = dict(c.storage_options or {})
    creds_file, creds_env = c.storage_credentials_file, c.storage_credentials_env
    if not c.get("local_s3", False):
        return merge_storage_options(public, read_credentials(_key(name), creds_file, creds_env))
    if server is None:
        return public
    if not creds_file and not creds_env:
        creds_file = server.credentials_path
    secret = read_credentials(_key(name), creds_file, creds_env)
    return merge_storage_options(public, secret, server.endpoint)


def _key(name: str) -> str:
    return f"fleet.clusters.{name}"


def resolve(fleet: DictConfig, state_dir: str) -> list[ClusterView]:
    """Every cluster of the fleet, in order of preference."""
    fdir = fleet_dir(state_dir, fleet.name)
    anchor = _anchor(fdir, create=False)
    server = S3Server.load(record_path(fdir))
    views = []
    for name, c in fleet.clusters.items():
        lease_start, lease_end = lease_window(c.lease_start, c.lease_end, anchor)
        address, dashboard, token, running = (
            c.address,
            c.dashboard_url,
            read_token(c.token_path, c.token_env),
            True,
        )
        if c.local:
            rec = LocalCluster.load(fdir / f"{name}.json")
            running = rec is not None and rec.is_running()
            if rec is not None:
                address, dashboard = rec.address, rec.dashboard_url
                token = read_token(rec.token_path, None)
                lease_start, lease_end = rec.lease_start, rec.lease_end
            else:
                # Not up: no address, and a lease relative to `fleet up` has not begun.
                lease_start = lease_end = None
        views.append(
            ClusterView(
                name=name,
                kind=c.kind,
                local=c.local,
                address=address,
                dashboard_url=dashboard,
                token=token,
                device_type=c.device_type,
                devices=c.devices,
                device_resource=c.device_resource,
                storage_root=c.storage_root,
                cost_per_device_hour=c.cost_per_device_hour,
                lease_start=lease_start,
                lease_end=lease_end,
                running=running,
                storage_options=_storage_options(name, c, server),
            )
        )
    return views


def _local_path(url: str) -> str | None:
    """The directory a storage root names on this machine (None: it is not on this machine)."""
    if url.startswith("file://"):
        return url[len("file://") :]
    return None if "://" in url else url


def _source_dirs() -> list[str]:
    """Where Spillway's own packages are installed, found without importing the recipes."""
    dirs = []
    for package in ("orchestrator", "recipes"):
        spec = importlib.util.find_spec(package)
        locations = (spec.submodule_search_locations or []) if spec is not None else []
        dirs += [p for p in locations if os.path.isdir(p)]
    return dirs


def _isolation_mounts(
    fleet: DictConfig, state_dir: str, name: str, cluster_dir: Path, temp_dir: Path
) -> list[dict[str, str]]:
    """The mount plan of an isolated cluster: the controller's state dir, every other cluster's
    disk and Spillway's sources hidden; its own temp dir, record dir (its token), storage root
    and the Python it runs visible."""
    own = _local_path(fleet.clusters[name].storage_root)
    others = [_local_path(c.storage_root) for n, c in fleet.clusters.items() if n != name]
    hide = [state_dir, *(p for p in others if p), *_source_dirs()]
    keep = [str(cluster_dir), str(temp_dir), *([own] if own else [])]
    keep += [sys.prefix, sys.base_prefix]
    real = sorted({os.path.realpath(os.path.expanduser(p)) for p in hide})
    kept = sorted({os.path.realpath(os.path.expanduser(p)) for p in keep} - set(real))
    return mount_plan(real, kept)


def _stderr_line(line: str) -> None:
    print(f"spillway: {line}", file=sys.stderr)


def _bucket(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0]


def _start_s3_server(fdir: Path, port: int) -> S3Server:
    old = S3Server.load(record_path(fdir))
    if old is not None:
        stop_s3_server(old)  # leftovers of a half-dead server
    # Fresh keys with every fresh server: nothing outlives the server's memory anyway.
    credentials_path(fdir).unlink(missing_ok=True)
    server = start_s3_server(fdir, port, base_env(os.environ))
    server.save(record_path(fdir))
    return server


def up(
    fleet: DictConfig, state_dir: str, notify: Callable[[str], None] = _stderr_line
) -> dict[str, str]:
    """Start the local clusters that are not running, and the fleet's S3 server if a local
    cluster keeps its storage there; returns what happened to each (the server as S3_SERVER).
    `notify` gets one line for each cluster that cannot be isolated here."""
    fdir = fleet_dir(state_dir, fleet.name)
    anchor = _anchor(fdir, create=True)
    outcome, to_start = {}, []
    local_s3 = [n for n, c in fleet.clusters.items() if c.local and c.get("local_s3", False)]
    server = S3Server.load(record_path(fdir))
    server_up = server is not None and server.is_running()
    for name, c in fleet.clusters.items():
        if not c.local:
            outcome[name] = "remote"
            continue
        rec = LocalCluster.load(fdir / f"{name}.json")
        # A cluster whose S3 server is gone carries a dead endpoint and keys: it starts again.
        if rec is not None and rec.is_running() and (server_up or name not in local_s3):
            outcome[name] = "running"
            continue
        if rec is not None:
            stop_local_cluster(rec)  # leftovers of a half-dead cluster
        to_start.append((name, c))
    # Ports for all of them from one pick, so clusters started side by side cannot collide.
    widths = [3 + c.get("nodes", 1) for _, c in to_start]
    start_server = bool(local_s3) and not server_up
    ports = free_ports(sum(widths) + (1 if start_server else 0))
    if start_server:
        server = _start_s3_server(fdir, ports.pop())
        outcome[S3_SERVER] = f"started at {server.endpoint}"
    elif local_s3:
        outcome[S3_SERVER] = f"running at {server.endpoint}"
    if local_s3:
        ensure_buckets(server, sorted({_bucket(fleet.clusters[n].storage_root) for n in local_s3}))
    refusal = namespace_refusal() if any(c.get("isolated", False) for _, c in to_start) else None
    host = controller_cluster(fleet)

    def start(name: str, c, cluster_ports: list[int]) -> LocalCluster:
        nodes = c.get("nodes", 1)
        num_cpus = c.num_cpus if c.num_cpus is not None else max(4, 2 * c.devices)
        cluster_dir, temp_dir = fdir / name, Path(state_dir) / "ray" / name
        extra = controller_env(fleet, state_dir, os.environ) if name == host else {}
        if name in local_s3:
            extra.update(s3_env(server.endpoint, server.credentials()))
        isolated, line = isolation_decision(name, c.get("isolated", False), refusal)
        if line:
            notify(line)
        mounts = (
            _isolation_mounts(fleet, state_dir, name, cluster_dir, temp_dir) if isolated else None
        )
        rec = start_local_cluster(
            name, c.devices, c.device_resource, num_cpus, cluster_dir, temp_dir, cluster_ports,
            nodes=nodes, mounts=mounts, extra_env=extra,
        )  # fmt: skip
        token = read_token(rec.token_path, None)
        try:
            wait_for_devices(name, rec.dashboard_url, token, c.device_resource, c.devices)
        except RuntimeError:
            stop_local_cluster(rec)  # half a cluster is not recorded as started
            raise
        # A cluster started later than the others still counts its lease from the fleet's start.
        rec.lease_start, rec.lease_end = lease_window(c.lease_start, c.lease_end, anchor)
        rec.save(fdir / f"{name}.json")
        return rec

    offsets = [sum(widths[:i]) for i in range(len(widths))]
    # Side by side: each `ray start` spends most of its seconds waiting on its own daemons.
    with ThreadPoolExecutor(max_workers=max(1, len(to_start))) as pool:
        starting = [
            pool.submit(start, name, c, ports[o : o + w])
            for (name, c), o, w in zip(to_start, offsets, widths, strict=True)
        ]
    for (name, _), done in zip(to_start, starting, strict=True):
        done.result()  # the first failure is raised; the clusters that started stay recorded
        outcome[name] = "started"
    return outcome


def down(fleet: DictConfig, state_dir: str) -> dict[str, list[int]]:
    """Stop the local clusters `up` started and the fleet's S3 server, by their own PIDs;
    returns the PIDs per cluster (the server's as S3_SERVER)."""
    fdir = fleet_dir(state_dir, fleet.name)
    records = {
        name: (fdir / f"{name}.json", rec)
        for name, c in fleet.clusters.items()
        if c.local and (rec := LocalCluster.load(fdir / f"{name}.json")) is not None
    }
    # All at once: each waits out its own grace period for processes that ignore SIGTERM.
    with ThreadPoolExecutor(max_workers=max(1, len(records))) as pool:
        stopping = {
            name: pool.submit(stop_local_cluster, rec) for name, (_, rec) in records.items()
        }
    stopped = {name: done.result() for name, done in stopping.items()}
    for path, _ in records.values():
        os.remove(path)
    server = S3Server.load(record_path(fdir))
    if server is not None:  # after the clusters: a rank may still be writing to its bucket
        stopped[S3_SERVER] = stop_s3_server(server)
        record_path(fdir).unlink()
        credentials_path(fdir).unlink(missing_ok=True)
    anchor = fdir / "up_at"
    if anchor.exists() and not any(fdir.glob("*.json")):
        anchor.unlink()
    return stopped
