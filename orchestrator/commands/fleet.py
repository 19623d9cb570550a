"""`spillway fleet up | down | status`."""

from __future__ import annotations

import argparse
import json
import time

from orchestrator.config import compose_run
from orchestrator.config.compose import ensure_state_dir
from orchestrator.console import duration, table


def fleet_config(overrides: list[str]):
    """The run config's fleet, validated; ConfigError names the key."""
    from orchestrator.fleet.checks import validate_fleet

    cfg = compose_run(overrides)
    validate_fleet(cfg.fleet)
    return cfg


def cmd_fleet_up(args: argparse.Namespace) -> int:
    from orchestrator.api.discovery import record_local_fleet
    from orchestrator.fleet import fleet

    cfg = fleet_config(args.overrides)
    ensure_state_dir(cfg.state_dir)
    outcome = fleet.up(cfg.fleet, cfg.state_dir)
    # Where later commands find the local fleet's controller (which `launch` starts).
    record_local_fleet(cfg.state_dir, cfg.fleet)
    views = fleet.resolve(cfg.fleet, cfg.state_dir)
    now = time.time()
    rows = [
        (
            v.name,
            v.kind,
            outcome[v.name],
            v.address,
            v.dashboard_url,
            v.devices,
            duration(v.lease_end and v.lease_end - now),
        )
        for v in views
    ]
    print(
        table(("cluster", "kind", "state", "address", "dashboard", "devices", "lease left"), rows)
    )
    if "s3-server" in outcome:
        print(f"s3 server: {outcome['s3-server']}")
    return 0


def cmd_fleet_down(args: argparse.Namespace) -> int:
    from orchestrator.fleet import fleet

    cfg = fleet_config(args.overrides)
    stopped = fleet.down(cfg.fleet, cfg.state_dir)
    if not stopped:
        print(f"fleet {cfg.fleet.name}: no local cluster was running")
    for name, pids in stopped.items():
        print(f"stopped {name}: {len(pids)} processes")
    return 0


def cmd_fleet_status(args: argparse.Namespace) -> int:
    from orchestrator.fleet import fleet
    from orchestrator.fleet.status import cluster_status

    cfg = fleet_config(args.overrides)
    rows = [cluster_status(v) for v in fleet.resolve(cfg.fleet, cfg.state_dir)]
    if args.json:
        print(
            json.dumps({"fleet": cfg.fleet.name, "clusters": [r.as_json() for r in rows]}, indent=1)
        )
        return 0
    print(
        table(
            (
                "cluster",
                "kind",
                "device",
                "reachable",
                "used",
                "free",
                "lease left",
                "$/device-h",
                "running jobs",
            ),
            [
                (
                    r.name,
                    r.kind,
                    r.device_type,
                    "yes" if r.reachable else f"no ({r.error})",
                    r.devices_used,
                    r.devices_free,
                    duration(r.lease_left_s),
                    r.cost_per_device_hour,
                    r.running_jobs,
                )  # fmt: skip
                for r in rows
            ],
        )
    )
    return 0
