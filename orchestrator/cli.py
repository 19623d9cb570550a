"""The `spillway` command."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.config import ConfigError, compose_run, pick_device_type, validate
from orchestrator.console import duration, table


def _bad_config(exc: ConfigError) -> int:
    print(f"spillway: bad config: {exc}", file=sys.stderr)
    return 2


def local_env(state_dir: str, nproc: int) -> dict[str, str]:
    """The environment of ranks started on this machine: temp files stay under the state dir."""
    tmp = Path(state_dir) / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SPILLWAY_HOME=state_dir, TMPDIR=str(tmp))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def cmd_run(args: argparse.Namespace) -> int:
    """Train a run config here, in the foreground, on resources.devices local ranks."""
    try:
        cfg = compose_run(args.overrides)
        nproc = cfg.resources.devices
        validate(cfg, nproc, device_type=pick_device_type(cfg.trainer.device))
    except ConfigError as exc:
        return _bad_config(exc)
    print(
        f"spillway: {cfg.run_name} on {nproc} local rank(s), run dir {cfg.run_dir}", file=sys.stderr
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", cfg.recipe.module, *args.overrides, f"run_dir={cfg.run_dir}",
    ]  # fmt: skip
    try:
        return subprocess.call(cmd, env=local_env(cfg.state_dir, nproc))
    except KeyboardInterrupt:
        # torchrun has already passed the interrupt on to the ranks; their output says where they stopped.
        return 130


def _fleet_config(overrides: list[str]):
    """The run config's fleet, validated; ConfigError names the key."""
    from orchestrator.fleet.checks import validate_fleet

    cfg = compose_run(overrides)
    validate_fleet(cfg.fleet)
    return cfg


def cmd_fleet_up(args: argparse.Namespace) -> int:
    from orchestrator.fleet import fleet

    try:
        cfg = _fleet_config(args.overrides)
    except ConfigError as exc:
        return _bad_config(exc)
    outcome = fleet.up(cfg.fleet, cfg.state_dir)
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
    return 0


def cmd_fleet_down(args: argparse.Namespace) -> int:
    from orchestrator.fleet import fleet

    try:
        cfg = _fleet_config(args.overrides)
    except ConfigError as exc:
        return _bad_config(exc)
    stopped = fleet.down(cfg.fleet, cfg.state_dir)
    if not stopped:
        print(f"fleet {cfg.fleet.name}: no local cluster was running")
    for name, pids in stopped.items():
        print(f"stopped {name}: {len(pids)} processes")
    return 0


def cmd_fleet_status(args: argparse.Namespace) -> int:
    from orchestrator.fleet import fleet
    from orchestrator.fleet.status import cluster_status

    try:
        cfg = _fleet_config(args.overrides)
    except ConfigError as exc:
        return _bad_config(exc)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spillway",
        description="Train on the GPUs you own, spill onto leased clusters, resume anywhere.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="train a run config on this machine (one process per device)",
        description="Compose conf/ with Hydra overrides, validate, and train on local ranks. "
        "Running the same command again resumes from the latest committed checkpoint.",
    )
    run.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. model=small trainer.max_steps=500"
    )
    run.set_defaults(func=cmd_run)

    fleet = sub.add_parser("fleet", help="start, stop and inspect the clusters of the fleet")
    fleet_sub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="ACTION")
    for name, func, text in (
        ("up", cmd_fleet_up, "start the fleet's local clusters that are not running (idempotent)"),
        ("down", cmd_fleet_down, "stop the local clusters `up` started, by their own PIDs"),
        (
            "status",
            cmd_fleet_status,
            "per cluster: reachable, devices used and free, lease left, cost, jobs",
        ),
    ):
        action = fleet_sub.add_parser(name, help=text, description=text)
        action.add_argument(
            "overrides",
            nargs="*",
            help="Hydra overrides, e.g. fleet.clusters.partner.lease_end=+10m",
        )
        if name == "status":
            action.add_argument(
                "--json", action="store_true", help="machine-readable, with dashboard URLs"
            )
        action.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
