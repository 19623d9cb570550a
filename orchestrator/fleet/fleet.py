"""The fleet as the controller sees it: each cluster resolved to an address, a token, a lease.

A local cluster's address, ports and token come from what `fleet up` recorded; a remote one's
from the config. Relative lease times count from the moment the fleet first came up, recorded
once so that status, policy and a restarted controller all agree on when a lease ends.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from orchestrator.fleet.leases import resolve_time
from orchestrator.fleet.local import (
    LocalCluster,
    free_ports,
    start_local_cluster,
    stop_local_cluster,
)
from orchestrator.fleet.tokens import read_token


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


def resolve(fleet: DictConfig, state_dir: str) -> list[ClusterView]:
    """Every cluster of the fleet, in order of preference."""
    fdir = fleet_dir(state_dir, fleet.name)
    anchor = _anchor(fdir, create=False)
    views = []
    for name, c in fleet.clusters.items():
        lease_start, lease_end = (
            resolve_time(c.lease_start, anchor),
            resolve_time(c.lease_end, anchor),
        )
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
            )
        )
    return views


def up(fleet: DictConfig, state_dir: str) -> dict[str, str]:
    """Start the local clusters that are not running; returns what happened to each cluster."""
    fdir = fleet_dir(state_dir, fleet.name)
    anchor = _anchor(fdir, create=True)
    outcome, to_start = {}, []
    for name, c in fleet.clusters.items():
        if not c.local:
            outcome[name] = "remote"
            continue
        rec = LocalCluster.load(fdir / f"{name}.json")
        if rec is not None and rec.is_running():
            outcome[name] = "running"
            continue
        if rec is not None:
            stop_local_cluster(rec)  # leftovers of a half-dead cluster
        to_start.append((name, c))
    # Ports for all of them from one pick, so clusters started side by side cannot collide.
    ports = free_ports(4 * len(to_start))

    def start(i: int, name: str, c) -> LocalCluster:
        num_cpus = c.num_cpus if c.num_cpus is not None else max(4, 2 * c.devices)
        rec = start_local_cluster(
            name,
            c.devices,
            c.device_resource,
            num_cpus,
            fdir / name,
            Path(state_dir) / "ray" / name,
            ports[4 * i : 4 * i + 4],
        )
        # A cluster started later than the others still counts its lease from the fleet's start.
        rec.lease_start = resolve_time(c.lease_start, anchor)
        rec.lease_end = resolve_time(c.lease_end, anchor)
        rec.save(fdir / f"{name}.json")
        return rec

    # Side by side: each `ray start` spends most of its seconds waiting on its own daemons.
    with ThreadPoolExecutor(max_workers=max(1, len(to_start))) as pool:
        starting = [pool.submit(start, i, name, c) for i, (name, c) in enumerate(to_start)]
    for (name, _), done in zip(to_start, starting, strict=True):
        done.result()  # the first failure is raised; the clusters that started stay recorded
        outcome[name] = "started"
    return outcome


def down(fleet: DictConfig, state_dir: str) -> dict[str, list[int]]:
    """Stop the local clusters `up` started, by their own PIDs; returns the PIDs per cluster."""
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
    anchor = fdir / "up_at"
    if anchor.exists() and not any(fdir.glob("*.json")):
        anchor.unlink()
    return stopped
