"""The `spillway` command: parses arguments and hands each command to orchestrator.commands."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import NoReturn

from orchestrator.commands import fleet as fleet_cmds
from orchestrator.commands import jobs as job_cmds
from orchestrator.commands.common import Refused, bad_config, refuse
from orchestrator.commands.run import cmd_run
from orchestrator.config import ConfigError
from orchestrator.config.compose import CONFIG_DIR_ENV, user_config_dir


class OneLineParser(argparse.ArgumentParser):
    """argparse's refusal is a usage block and a line; Spillway's is one line, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="spillway",
        description="Train on the GPUs you own, spill onto leased clusters, resume anywhere.",
    )
    parser.add_argument(
        "--config-dir",
        metavar="DIR",
        help="your own config groups beside Spillway's (DIR/fleet/mine.yaml gives fleet=mine); "
        f"sets ${CONFIG_DIR_ENV}",
    )
    # Subparsers are made by the parser's class: they refuse in one line too.
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
        (
            "up",
            fleet_cmds.cmd_fleet_up,
            "start the fleet's local clusters that are not running (idempotent)",
        ),
        (
            "down",
            fleet_cmds.cmd_fleet_down,
            "stop the local clusters `up` started, by their own PIDs",
        ),
        (
            "status",
            fleet_cmds.cmd_fleet_status,
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

    job_cmds.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # `spillway status | head` should end quietly, as any Unix filter does.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = build_parser().parse_args(argv)
    try:
        if args.config_dir is not None:
            # Through the environment, so that processes we start (torchrun) compose alike.
            os.environ[CONFIG_DIR_ENV] = args.config_dir
            user_config_dir(source="--config-dir")
        return args.func(args)
    except ConfigError as exc:
        return bad_config(exc)
    except Refused as exc:
        return refuse(str(exc))


if __name__ == "__main__":
    sys.exit(main())
