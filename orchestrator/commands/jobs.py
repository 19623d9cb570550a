"""`spillway launch | status | logs | cancel | wait | metrics | resume`.

Requests that change a job go to the controller actor on the home cluster; reads come straight
from its SQLite state (WAL lets them run beside the controller), so `status` works even while
the controller restarts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from orchestrator.commands.common import Refused
from orchestrator.config import ConfigError, compose_run, spillway_home, validate
from orchestrator.console import duration, table
from orchestrator.controller.job_states import TERMINAL, AttemptState, JobState
from orchestrator.controller.jobs import allowed_world_sizes, job_record, job_request
from orchestrator.controller.paths import attempt_dir
from orchestrator.controller.requests import cancel_job, migrate_job, resume_job, submit_job
from orchestrator.controller.state import ControllerState, InvalidTransition, JobRecord
from orchestrator.fleet import fleet as fleet_mod
from orchestrator.fleet.checks import validate_fleet
from orchestrator.fleet.fleet import ClusterView
from orchestrator.scheduling import ClusterSnapshot, infeasible
from orchestrator.tracking.metrics import read_metrics

# ---- launch -------------------------------------------------------------------------------


def launch_config(overrides: list[str]) -> DictConfig:
    """The run config, refused with ConfigError unless some cluster of its fleet could run it."""
    cfg = compose_run(overrides)
    validate_fleet(cfg.fleet)
    sizes = allowed_world_sizes(cfg)
    if not sizes:
        low = cfg.resources.min_devices or cfg.resources.devices
        raise ConfigError(
            "resources.devices",
            f"no world size from {low} to {cfg.resources.devices} divides "
            f"trainer.global_batch_size={cfg.trainer.global_batch_size}",
        )
    device_types = {c.device_type for c in cfg.fleet.clusters.values()}
    validate(cfg, sizes[0], device_type="cpu" if device_types == {"cpu"} else None)
    # Static check: lease timing and free devices do not matter here, only whether it ever fits.
    snapshots = [
        ClusterSnapshot(
            name=name,
            kind=c.kind,
            device_type=c.device_type,
            devices_total=c.devices,
            devices_free=c.devices,
            cost_per_device_hour=c.cost_per_device_hour,
            lease_start=0.0 if c.kind == "leased" else None,
            lease_end=float("inf") if c.kind == "leased" else None,
        )  # fmt: skip
        for name, c in cfg.fleet.clusters.items()
    ]
    reason = infeasible(job_request(job_record("preview", cfg, overrides)), snapshots)
    if reason:
        key = (
            "placement.clusters"
            if cfg.placement.clusters and "placement.clusters" in reason
            else "resources.devices"
        )
        raise ConfigError(key, reason)
    return cfg


def home_cluster(cfg: DictConfig) -> ClusterView:
    """Where the controller lives: the first owned cluster in fleet order."""
    views = fleet_mod.resolve(cfg.fleet, cfg.state_dir)
    return next(v for v in views if v.kind == "owned")


def ensure_fleet(cfg: DictConfig) -> None:
    """A newcomer's first launch on the local fleet starts it, and says so."""
    views = fleet_mod.resolve(cfg.fleet, cfg.state_dir)
    stopped = [v.name for v in views if v.local and not v.running]
    if stopped:
        print(f"spillway: starting the local fleet ({', '.join(stopped)})...", file=sys.stderr)
        fleet_mod.up(cfg.fleet, cfg.state_dir)


HEARTBEAT_STALE_S = 10.0


def ensure_controller(cfg: DictConfig, state: ControllerState) -> None:
    """Start the fleet's controller on its home cluster unless its heartbeat is fresh."""
    from orchestrator.controller.service import FLEET_ENV, actor_name

    beat = state.last_heartbeat(actor_name(cfg.fleet.name))
    if beat is not None and time.time() - beat[2] < HEARTBEAT_STALE_S:
        return
    from ray.job_submission import JobSubmissionClient

    from orchestrator.fleet.tokens import auth_headers

    home = home_cluster(cfg)
    print(f"spillway: starting the controller on {home.name}...", file=sys.stderr)
    client = JobSubmissionClient(home.dashboard_url, headers=auth_headers(home.token))
    python = sys.executable if home.local else "python"
    env = {"SPILLWAY_HOME": cfg.state_dir, FLEET_ENV: json.dumps(OmegaConf.to_container(cfg.fleet))}
    boot = client.submit_job(
        entrypoint=f"{python} -m orchestrator.controller.service", runtime_env={"env_vars": env}
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        beat = state.last_heartbeat(actor_name(cfg.fleet.name))
        if beat is not None and time.time() - beat[2] < HEARTBEAT_STALE_S:
            return
        if (
            client.get_job_status(boot).is_terminal()
            and str(client.get_job_status(boot)) != "SUCCEEDED"
        ):
            raise RuntimeError(
                f"the controller did not start:\n{client.get_job_logs(boot)[-3000:]}"
            )
        time.sleep(0.5)
    raise RuntimeError("the controller started but never reported (no heartbeat within 120s)")


def cmd_launch(args: argparse.Namespace) -> int:
    cfg = launch_config(args.overrides)
    ensure_fleet(cfg)
    state = ControllerState.open(Path(cfg.state_dir) / "controller.db")
    ensure_controller(cfg, state)
    job_id = submit_job(state, cfg, list(args.overrides), time.time())
    print(json.dumps({"job_id": job_id}) if args.json else job_id)
    if not args.wait:
        return 0
    return follow(job_id, cfg.trainer.max_steps, timeout_s=None)


# ---- reading the state --------------------------------------------------------------------


def open_state() -> ControllerState | None:
    path = Path(spillway_home()) / "controller.db"
    return ControllerState.open(path) if path.exists() else None


def job_clusters(job: JobRecord) -> dict[str, ClusterView]:
    fleet_cfg = OmegaConf.create(json.loads(job.run_config)["fleet"])
    return {v.name: v for v in fleet_mod.resolve(fleet_cfg, spillway_home())}


def job_metrics(state: ControllerState, job: JobRecord) -> list[dict]:
    """Every metrics line of every attempt, tagged with its attempt and cluster."""
    clusters = job_clusters(job)
    lines = []
    for a in state.attempts(job.job_id):
        path = Path(attempt_dir(clusters[a.cluster], job.job_id, a.attempt)) / "metrics.jsonl"
        if path.exists():
            lines += [{**r, "attempt": a.attempt, "cluster": a.cluster} for r in read_metrics(path)]
    return lines


def _load(job_id: str) -> tuple[ControllerState, JobRecord] | None:
    state = open_state()
    job = state.get_job(job_id) if state else None
    return (state, job) if job else None


def require_job(job_id: str) -> tuple[ControllerState, JobRecord]:
    loaded = _load(job_id)
    if loaded is None:
        raise Refused(f"no job {job_id}")
    return loaded


def follow(job_id: str, max_steps: int, timeout_s: float | None) -> int:
    """A progress bar of steps and loss until the job ends, and one of bytes while its
    checkpoint is copied to another cluster; exit 0 only if it SUCCEEDED."""
    from tqdm import tqdm

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    bar = tqdm(total=max_steps, desc=job_id, unit="step", dynamic_ncols=True, file=sys.stderr)
    copy_bar = None
    try:
        while True:
            loaded = _load(job_id)
            if loaded:
                state, job = loaded
                lines = job_metrics(state, job)
                if lines:
                    bar.n = lines[-1]["step"]
                    bar.set_postfix(
                        loss=f"{lines[-1]['loss']:.4f}",
                        cluster=lines[-1]["cluster"],
                        state=job.state.value,
                    )
                    bar.refresh()
                attempt = state.latest_attempt(job_id)
                if attempt and attempt.state == AttemptState.PREPARING and attempt.copy_bytes_total:
                    if copy_bar is None:
                        copy_bar = tqdm(
                            total=attempt.copy_bytes_total, desc=f"checkpoint to {attempt.cluster}",
                            unit="B", unit_scale=True, dynamic_ncols=True, file=sys.stderr,
                        )  # fmt: skip
                    copy_bar.update(attempt.copy_bytes_done - copy_bar.n)
                elif copy_bar is not None:
                    copy_bar.close()
                    copy_bar = None
                if job.state in TERMINAL:
                    bar.close()
                    print(f"{job_id}: {job.state.value} ({job.reason})", file=sys.stderr)
                    return 0 if job.state == JobState.SUCCEEDED else 1
            if deadline is not None and time.monotonic() > deadline:
                bar.close()
                print(f"spillway: {job_id} not finished after {timeout_s:.0f}s", file=sys.stderr)
                return 124
            time.sleep(1.0)
    finally:
        if copy_bar is not None:
            copy_bar.close()
        bar.close()


def cmd_wait(args: argparse.Namespace) -> int:
    _, job = require_job(args.job)
    max_steps = json.loads(job.run_config)["trainer"]["max_steps"]
    return follow(args.job, max_steps, args.timeout)


def _attempts_json(state: ControllerState, job_id: str) -> list[dict]:
    """Each attempt's record, plus resume_s: from the previous attempt's drain or fault to this
    attempt's first step (what moving or recovering cost in wall time)."""
    out, before = [], None
    for a in state.attempts(job_id):
        row = {**{k: getattr(a, k) for k in a.__dataclass_fields__}, "state": a.state.value}
        since = before and (before.interrupted_at or before.ended_at)
        row["resume_s"] = a.first_step_at - since if since and a.first_step_at else None
        out.append(row)
        before = a
    return out


def _job_json(state: ControllerState, job: JobRecord, detail: bool) -> dict:
    out = {
        "job_id": job.job_id, "name": job.name, "state": job.state.value, "reason": job.reason,
        "submitted_at": job.submitted_at, "updated_at": job.updated_at, "cost": job.cost_so_far,
        "restarts": job.restarts, "attempts": _attempts_json(state, job.job_id),
    }  # fmt: skip
    if detail:
        out["checkpoints"] = [
            {"step": c.step, "cluster": c.cluster, "url": c.url, "bytes": c.bytes,
             "verified": c.verified, "recorded_at": c.recorded_at}
            for c in state.checkpoints(job.job_id)
        ]  # fmt: skip
        out["events"] = [
            {"at": e.at, "kind": e.kind, "from": e.from_state and e.from_state.value,
             "to": e.to_state and e.to_state.value, "cause": e.cause, "attempt": e.attempt}
            for e in state.events(job.job_id)
        ]  # fmt: skip
    return out


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


def cmd_status(args: argparse.Namespace) -> int:
    state = open_state()
    jobs = state.list_jobs() if state else []
    if args.job:
        state, job = require_job(args.job)
        info = _job_json(state, job, detail=True)
        if args.json:
            print(json.dumps(info, indent=1))
            return 0
        print(
            f"{job.job_id}  {job.name}  {job.state.value}  cost {job.cost_so_far:.4f}  "
            f"restarts {job.restarts}  ({job.reason})"
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
        return 0
    if args.json:
        print(json.dumps({"jobs": [_job_json(state, j, detail=False) for j in jobs]}, indent=1))
        return 0
    rows = []
    for j in jobs:
        a = state.latest_attempt(j.job_id)
        rows.append((j.job_id, j.name, j.state.value, a and a.cluster, a and a.world_size,
                     a and a.last_step, f"{j.cost_so_far:.4f}", j.reason))  # fmt: skip
    print(table(("job", "name", "state", "cluster", "world", "step", "cost", "why"), rows))
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    lines = job_metrics(*require_job(args.job))
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


def cmd_logs(args: argparse.Namespace) -> int:
    from orchestrator.backends.ray_jobs import RayJobsBackend

    state, job = require_job(args.job)
    attempt = state.latest_attempt(job.job_id)
    if attempt is None or attempt.ray_job_id is None:
        raise Refused(f"job {args.job} has not started yet ({job.reason})")
    backend = RayJobsBackend(job_clusters(job)[attempt.cluster])
    if args.follow:
        for chunk in backend.follow_logs(attempt.ray_job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    else:
        sys.stdout.write(backend.logs(attempt.ray_job_id))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    state, job = require_job(args.job)
    job = cancel_job(state, args.job, time.time())
    print(f"{args.job}: {job.state.value}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    state, job = require_job(args.job)
    if job.state not in TERMINAL:
        raise Refused(
            f"job {args.job} is {job.state.value}; only a finished, failed or cancelled job resumes"
        )
    overrides = [*job.overrides, *args.overrides]
    cfg = launch_config(overrides)
    ensure_fleet(cfg)
    ensure_controller(cfg, state)
    print(f"{args.job}: {resume_job(state, args.job, cfg, overrides, time.time()).state.value}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    state, job = require_job(args.job)
    clusters = job_clusters(job)
    if args.to not in clusters:
        raise Refused(f"--to {args.to}: no such cluster (allowed: {', '.join(clusters)})")
    if job.state != JobState.RUNNING:
        raise Refused(f"job {args.job} is {job.state.value}; only a running job migrates")
    try:
        job = migrate_job(state, args.job, args.to, time.time())
    except InvalidTransition as exc:
        raise Refused(str(exc)) from None
    print(
        f"{args.job}: {job.state.value} (drains at its next step boundary, then moves to {args.to})"
    )
    if args.wait:
        max_steps = json.loads(job.run_config)["trainer"]["max_steps"]
        return follow(args.job, max_steps, None)
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
