"""`spillway launch | status | logs | cancel | wait | metrics | resume | migrate`.

A thin client of the controller's HTTP API (orchestrator/api): the CLI composes and checks run
configs and prints; the controller alone owns its SQLite state. Where the CLI finds the
controller is orchestrator.api.discovery's docstring. For the local fleet `launch` also starts
the fleet and the controller when they are not up.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from orchestrator.api import discovery
from orchestrator.api.client import ApiClient, ApiError, Rejected, Unreachable
from orchestrator.commands.common import Refused
from orchestrator.config import ConfigError, compose_run, spillway_home
from orchestrator.config.compose import ensure_state_dir
from orchestrator.console import duration, table
from orchestrator.scheduling.admission import admit
from orchestrator.scheduling.job_states import TERMINAL, JobState

TERMINAL_NAMES = {s.value for s in TERMINAL}
# How long `wait` keeps asking a controller that does not answer (Ray restarts a killed one).
RIDE_OUT_S = 60.0
POLL_S = 1.0


def through_api(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Whatever the API says no with becomes the one-line refusal (exit 2)."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except ApiError as exc:
            raise Refused(str(exc)) from None

    return run


# ---- finding the controller ---------------------------------------------------------------


class NoController(ApiError):
    pass


def connect() -> ApiClient:
    """The controller this SPILLWAY_HOME knows of, for commands that compose no run config."""
    home = spillway_home()
    endpoint = discovery.find(home, None)
    if endpoint is None:
        # No client.json: the default fleet's controller.url, or its local record.
        fleet = compose_run([]).fleet
        endpoint = discovery.find(home, fleet)
        if endpoint is None:
            raise NoController(
                f"no controller known: {discovery.client_file(home)} does not exist and fleet "
                f"{fleet.name} has none recorded (`spillway launch` or `spillway fleet up` "
                "records the local fleet's; for another, write client.json with url and "
                "token_path)"
            )
    return ApiClient(endpoint)


def launch_config(overrides: list[str]) -> DictConfig:
    """The run config, refused with ConfigError unless some cluster of its fleet could run it."""
    cfg = compose_run(overrides)
    admit(cfg)
    return cfg


def ensure_fleet(cfg: DictConfig) -> None:
    """A newcomer's first launch on the local fleet starts it, and says so."""
    from orchestrator.fleet import fleet as fleet_mod

    views = fleet_mod.resolve(cfg.fleet, cfg.state_dir)
    stopped = [v.name for v in views if v.local and not v.running]
    if stopped:
        print(f"spillway: starting the local fleet ({', '.join(stopped)})...", file=sys.stderr)
        fleet_mod.up(cfg.fleet, cfg.state_dir)


def ensure_controller(cfg: DictConfig, client: ApiClient, fleet_cfg: dict) -> None:
    """Nothing if the controller answers; else bootstrap it on the fleet's home head."""
    try:
        client.health()
        return
    except Unreachable as exc:
        unreachable = exc
    from orchestrator.api.bootstrap import start_controller
    from orchestrator.fleet import fleet as fleet_mod

    views = fleet_mod.resolve(cfg.fleet, cfg.state_dir)
    home = next(v for v in views if v.kind == "owned")
    if not (home.local or (home.dashboard_url and home.token)):
        raise unreachable  # no way in to start it: say why it cannot be reached
    print(f"spillway: starting the controller on {home.name}...", file=sys.stderr)
    token_env = fleet_cfg["controller"].get("token_env")
    start_controller(
        client, home, cfg.state_dir, fleet_cfg, os.environ.get(token_env) if token_env else None
    )


def connect_for_launch(cfg: DictConfig) -> ApiClient:
    """The controller a launch goes to: found as discovery says; for the local fleet (and a
    remote home this CLI can reach the head of) started when it does not answer."""
    home = cfg.state_dir
    ensure_state_dir(home)  # before anything below writes the first file into it
    endpoint = discovery.find(home, cfg.fleet)
    fleet_cfg = OmegaConf.to_container(cfg.fleet)
    local = None
    if discovery.is_local_home(cfg.fleet) and discovery.from_fleet(cfg.fleet) is None:
        # Unless client.json names another controller, this home runs the local fleet's.
        if endpoint is None or discovery.is_local_fleets(endpoint, home, cfg.fleet.name):
            local = discovery.local_controller(home, cfg.fleet.name, create=True)
            endpoint = local.endpoint()
    if endpoint is None:
        raise ConfigError(
            "fleet.controller.url",
            f"fleet {cfg.fleet.name} has no local home cluster and names no controller "
            f"(set fleet.controller.url and token_path or token_env, or write "
            f"{discovery.client_file(home)})",
        )
    client = ApiClient(endpoint)  # refuses an insecure URL or a missing token, before anything
    from_client_file = endpoint.source == str(discovery.client_file(home))
    if local is not None:
        ensure_fleet(cfg)
        ensure_controller(cfg, client, local.fleet_config(fleet_cfg))
    elif not from_client_file:
        ensure_controller(cfg, client, fleet_cfg)
    if not from_client_file:
        discovery.write_client_file(home, endpoint)  # for status, logs, ... later
    return client


# ---- launch -------------------------------------------------------------------------------


@through_api
def cmd_launch(args: argparse.Namespace) -> int:
    cfg = launch_config(args.overrides)
    client = connect_for_launch(cfg)
    job_id = client.submit(OmegaConf.to_container(cfg), list(args.overrides))
    print(json.dumps({"job_id": job_id}) if args.json else job_id)
    if not args.wait:
        return 0
    return follow(client, job_id, timeout_s=None)


# ---- following a job ----------------------------------------------------------------------


class Patience:
    """Failed requests are tolerated for RIDE_OUT_S in a row, then the last one is raised."""

    def __init__(self, ride_out_s: float | None = None) -> None:
        self.ride_out_s = RIDE_OUT_S if ride_out_s is None else ride_out_s
        self.failing_since: float | None = None

    def ok(self) -> None:
        self.failing_since = None

    def failed(self, exc: Unreachable) -> None:
        now = time.monotonic()
        self.failing_since = self.failing_since or now
        if now - self.failing_since > self.ride_out_s:
            raise Unreachable(f"{exc}; gave up after {self.ride_out_s:.0f}s of failed requests")


def follow(client: ApiClient, job_id: str, timeout_s: float | None) -> int:
    """A progress bar of steps and loss until the job ends, and one of bytes while its
    checkpoint is copied to another cluster; exit 0 only if it SUCCEEDED, 124 on timeout.
    A controller that stops answering (restarting) is waited for up to RIDE_OUT_S."""
    from tqdm import tqdm

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    bar = copy_bar = None
    patience = Patience()
    try:
        while True:
            try:
                p = client.progress(job_id)
                patience.ok()
            except Unreachable as exc:
                patience.failed(exc)
                p = None
                if bar is not None:
                    bar.set_postfix_str("controller not answering; retrying")
            if p is not None:
                if bar is None:
                    bar = tqdm(
                        total=p["max_steps"], desc=job_id, unit="step", dynamic_ncols=True,
                        file=sys.stderr,
                    )  # fmt: skip
                if p["step"] is not None:
                    bar.n = p["step"]
                    loss = f"{p['loss']:.4f}" if p["loss"] is not None else "-"
                    bar.set_postfix(loss=loss, cluster=p["cluster"], state=p["state"])
                    bar.refresh()
                copy = p["copy"]
                if copy:
                    if copy_bar is None:
                        copy_bar = tqdm(
                            total=copy["total"], desc=f"checkpoint to {copy['cluster']}",
                            unit="B", unit_scale=True, dynamic_ncols=True, file=sys.stderr,
                        )  # fmt: skip
                    copy_bar.update(copy["done"] - copy_bar.n)
                elif copy_bar is not None:
                    copy_bar.close()
                    copy_bar = None
                if p["state"] in TERMINAL_NAMES:
                    bar.close()
                    print(f"{job_id}: {p['state']} ({p['reason']})", file=sys.stderr)
                    return 0 if p["state"] == JobState.SUCCEEDED.value else 1
            if deadline is not None and time.monotonic() > deadline:
                if bar is not None:
                    bar.close()
                print(f"spillway: {job_id} not finished after {timeout_s:.0f}s", file=sys.stderr)
                return 124
            time.sleep(POLL_S)
    finally:
        if copy_bar is not None:
            copy_bar.close()
        if bar is not None:
            bar.close()


@through_api
def cmd_wait(args: argparse.Namespace) -> int:
    # An unknown job is refused at once (404); a controller that does not answer is waited for.
    return follow(connect(), args.job, args.timeout)


# ---- status -------------------------------------------------------------------------------


def _megabytes(n: int | None) -> str | None:
    return None if not n else f"{n / 1e6:.1f} MB"


def _copy_line(a: dict, now: float) -> str | None:
    """While a checkpoint is copied to a PREPARING attempt's cluster: how far, how fast."""
    if a["state"] != "PREPARING" or not a["copy_bytes_total"]:
        return None
    done, total = a["copy_bytes_done"], a["copy_bytes_total"]
    rate = done / max(now - a["created_at"], 1e-6) / 1e6
    return (
        f"copying the checkpoint to {a['cluster']}: {done / 1e6:.1f}/{total / 1e6:.1f} MB "
        f"({100 * done / total:.0f}%, {rate:.1f} MB/s)"
    )


def _print_job(info: dict) -> None:
    print(
        f"{info['job_id']}  {info['name']}  {info['state']}  cost {info['cost']:.4f}  "
        f"restarts {info['restarts']}  ({info['reason']})"
    )
    now = time.time()
    print(table(
        ("attempt", "cluster", "world", "state", "steps", "redone", "resume", "copied",
         "started", "ended", "cost"),
        [(a["attempt"], a["cluster"], a["world_size"], a["state"],
          f"{a['first_step']}-{a['last_step']}" if a["first_step"] else None,
          a["steps_redone"] if a["attempt"] > 1 else None,
          f"{a['resume_s']:.1f}s" if a["resume_s"] is not None else None,
          _megabytes(a["copy_bytes_done"] if a["copy_s"] is not None else None),
          duration(now - a["started_at"]) + " ago" if a["started_at"] else None,
          duration(now - a["ended_at"]) + " ago" if a["ended_at"] else None, f"{a['cost']:.4f}")
         for a in info["attempts"]],
    ))  # fmt: skip
    for a in info["attempts"]:
        if line := _copy_line(a, now):
            print(line)
    if info["checkpoints"]:
        print("checkpoints: " + ", ".join(
            f"{c['step']} on {c['cluster']} ({_megabytes(c['bytes'])}"
            f"{', verified copy' if c['verified'] else ''})" for c in info["checkpoints"]
        ))  # fmt: skip
    print(table(
        ("when", "event", "cause"),
        [(time.strftime("%H:%M:%S", time.localtime(e["at"])),
          f"{e['from'] or ''}->{e['to']}" if e["to"] else e["kind"], e["cause"]) for e in info["events"]],
    ))  # fmt: skip


@through_api
def cmd_status(args: argparse.Namespace) -> int:
    if args.job:
        info = connect().job(args.job)
        if args.json:
            print(json.dumps(info, indent=1))
        else:
            _print_job(info)
        return 0
    try:
        jobs = connect().jobs()
    except NoController:
        jobs = []  # nothing was ever launched from this SPILLWAY_HOME
    if args.json:
        print(json.dumps({"jobs": jobs}, indent=1))
        return 0
    rows = []
    for j in jobs:
        a = j["attempts"][-1] if j["attempts"] else None
        rows.append((j["job_id"], j["name"], j["state"], a and a["cluster"],
                     a and a["world_size"], a and a["last_step"], f"{j['cost']:.4f}",
                     j["reason"]))  # fmt: skip
    print(table(("job", "name", "state", "cluster", "world", "step", "cost", "why"), rows))
    return 0


@through_api
def cmd_metrics(args: argparse.Namespace) -> int:
    lines = connect().metrics(args.job)
    if args.json:
        for line in lines:
            print(json.dumps(line))
        return 0
    print(table(
        ("step", "loss", "lr", "world", "tokens/s", "attempt", "cluster"),
        [(r["step"], f"{r['loss']:.4f}", f"{r['lr']:.2e}", r["world_size"], f"{r['tokens_per_s']:,.0f}",
          r["attempt"], r["cluster"]) for r in lines],
    ))  # fmt: skip
    return 0


@through_api
def cmd_logs(args: argparse.Namespace) -> int:
    client = connect()
    got = client.logs(args.job, only=args.attempt)
    sys.stdout.write(got["text"])
    sys.stdout.flush()
    patience = Patience()
    while args.follow and not got["done"]:
        time.sleep(POLL_S)
        try:
            got = client.logs(args.job, got["attempt"], got["offset"])
            patience.ok()
        except Unreachable as exc:
            patience.failed(exc)
            continue
        sys.stdout.write(got["text"])
        sys.stdout.flush()
    return 0


@through_api
def cmd_cancel(args: argparse.Namespace) -> int:
    job = connect().cancel(args.job)
    print(f"{args.job}: {job['state']}")
    return 0


@through_api
def cmd_resume(args: argparse.Namespace) -> int:
    client = connect()
    info = client.job(args.job)
    if info["state"] not in TERMINAL_NAMES:
        raise Refused(
            f"job {args.job} is {info['state']}; only a finished, failed or cancelled job resumes"
        )
    overrides = [*info["overrides"], *args.overrides]
    cfg = launch_config(overrides)
    job = client.resume(args.job, OmegaConf.to_container(cfg), overrides)
    print(f"{args.job}: {job['state']}")
    return 0


@through_api
def cmd_migrate(args: argparse.Namespace) -> int:
    client = connect()
    try:
        job = client.migrate(args.job, args.to)
    except Rejected as exc:
        if exc.key == "to":
            raise Refused(f"--to {args.to}: {str(exc).split(': ', 1)[-1]}") from None
        raise
    print(f"{args.job}: {job['state']} (drains at its next step boundary, then moves to {args.to})")
    if args.wait:
        return follow(client, args.job, None)
    return 0


def add_parsers(sub) -> None:
    launch = sub.add_parser("launch", help="submit a run to the fleet's controller")
    launch.add_argument("overrides", nargs="*", help="Hydra overrides of the run config")
    launch.add_argument(
        "--wait", action="store_true", help="follow with a progress bar until it ends"
    )
    launch.add_argument("--json", action="store_true", help='print {"job_id": ...}')
    launch.set_defaults(func=cmd_launch)

    status = sub.add_parser("status", help="the queue, or one job with its attempts and events")
    status.add_argument("job", nargs="?")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    logs = sub.add_parser("logs", help="the Ray job logs of a job's latest attempt")
    logs.add_argument("job")
    logs.add_argument("-f", "--follow", action="store_true")
    logs.add_argument("--attempt", type=int, metavar="N", help="an earlier attempt's logs")
    logs.set_defaults(func=cmd_logs)

    for name, func, text in (("cancel", cmd_cancel, "stop a job"),):
        p = sub.add_parser(name, help=text)
        p.add_argument("job")
        p.set_defaults(func=func)

    wait = sub.add_parser("wait", help="wait for a job; exit 0 only if it SUCCEEDED")
    wait.add_argument("job")
    wait.add_argument("--timeout", type=float, default=None, metavar="S")
    wait.set_defaults(func=cmd_wait)

    metrics = sub.add_parser(
        "metrics", help="metrics.jsonl lines of every attempt, with attempt and cluster"
    )
    metrics.add_argument("job")
    metrics.add_argument("--json", action="store_true")
    metrics.set_defaults(func=cmd_metrics)

    resume = sub.add_parser(
        "resume", help="a new attempt of a finished job from its latest checkpoint"
    )
    resume.add_argument("job")
    resume.add_argument("overrides", nargs="*")
    resume.set_defaults(func=cmd_resume)

    migrate = sub.add_parser("migrate", help="drain a running job and move it, with its checkpoint")
    migrate.add_argument("job")
    migrate.add_argument("--to", required=True, metavar="CLUSTER")
    migrate.add_argument(
        "--wait", action="store_true", help="follow the drain, the copy and the job to its end"
    )
    migrate.set_defaults(func=cmd_migrate)
