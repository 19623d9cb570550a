"""The reconcile loop: watch every attempt, recover from faults, place pending jobs, bring their
checkpoints along, submit; nothing twice.

All durable facts live in ControllerState, so a controller that dies and comes back reloads
them and carries on: attempts still running are polled by their Ray submission id, an attempt
recorded but perhaps never submitted is looked up by its deterministic id first, and a
checkpoint copy that was under way is started again (a copy commits on its target only once,
verified, so a repeat copies nothing into use twice).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from orchestrator import exit_codes
from orchestrator.backends.base import TERMINAL, ClusterBackend
from orchestrator.backends.ray_jobs import RayJobsBackend, submission_id
from orchestrator.controller import migration
from orchestrator.controller.job_states import AttemptState, JobState
from orchestrator.controller.jobs import job_request
from orchestrator.controller.paths import attempt_dir, checkpoints_url, run_files
from orchestrator.controller.recovery import (
    Outcome,
    classify,
    cluster_at_fault,
    recover,
)
from orchestrator.controller.requests import ACTIVE
from orchestrator.controller.state import (
    AttemptRecord,
    ControllerState,
    InvalidTransition,
    JobRecord,
)
from orchestrator.fleet import fleet as fleet_mod
from orchestrator.fleet.fleet import ClusterView
from orchestrator.fleet.probe import ClusterHealth, probe
from orchestrator.runtime.spec import AttemptSpec, attempt_run_config
from orchestrator.scheduling import ClusterSnapshot, Placement, place
from orchestrator.scheduling.preemption import Running, preemptions

log = logging.getLogger("spillway.controller")

__all__ = ["Controller", "attempt_dir", "checkpoints_url"]

# How long placement waits for a copy before leaving it to its thread and the next ticks.
COPY_INLINE_WAIT_S = 1.0


def _placement(job: JobRecord) -> dict:
    return json.loads(job.run_config)["placement"]


class Controller:
    """The reconcile loop over one state dir and one fleet.

    Everything it touches outside its own state is injected, so its unit tests run it on an
    in-memory fleet: `backend_for` gives the backend of one cluster (the Ray Jobs API by
    default), `probe` asks a cluster how it is, `clock` tells the time and `fleet` resolves
    the clusters (their storage roots are where run files and checkpoints live)."""

    def __init__(
        self,
        state_dir: str,
        fleet_cfg: DictConfig,
        backend_for: Callable[[ClusterView], ClusterBackend] = RayJobsBackend,
        probe: Callable[[ClusterView], ClusterHealth] = probe,
        clock: Callable[[], float] = time.time,
        fleet: Callable[[], list[ClusterView]] | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.fleet_cfg = fleet_cfg
        self.state = ControllerState.open(Path(state_dir) / "controller.db")
        self._backend_for = backend_for
        self._probe_cluster = probe
        self.clock = clock
        self._fleet = fleet or (lambda: fleet_mod.resolve(fleet_cfg, state_dir))
        # Requests from the CLI and the loop never interleave inside one decision.
        self.lock = threading.RLock()
        self._copies: dict[tuple[str, int], threading.Thread] = {}
        self._unreachable_since: dict[str, float] = {}
        self._health: dict[str, ClusterHealth] = {}  # this tick's probes
        # Per cluster: the (address, token) a backend was made for, and the backend.
        self._backends: dict[str, tuple[tuple, ClusterBackend]] = {}

    def clusters(self) -> dict[str, ClusterView]:
        return {v.name: v for v in self._fleet()}

    def _order(self, job: JobRecord) -> list[str]:
        """The clusters the job accepts, in its order, else the fleet's."""
        return list(job.clusters) or list(self.fleet_cfg.clusters)

    def _job(self, job_id: str) -> JobRecord:
        job = self.state.get_job(job_id)
        if job is None:
            raise KeyError(f"no job {job_id}")
        return job

    def backend(self, cluster: ClusterView) -> ClusterBackend:
        """One backend per cluster address and token, kept across ticks: making a Jobs API
        client costs an HTTP round trip. A cluster that stops answering gets a fresh one."""
        key = (cluster.dashboard_url, cluster.token)
        cached = self._backends.get(cluster.name)
        if cached is None or cached[0] != key:
            cached = self._backends[cluster.name] = (key, self._backend_for(cluster))
        return cached[1]

    def _probe(self, cluster: ClusterView) -> ClusterHealth:
        if cluster.name not in self._health:
            self._health[cluster.name] = self._probe_cluster(cluster)
        return self._health[cluster.name]

    # ---- the loop -----------------------------------------------------------------------

    def reconcile(self, now: float) -> None:
        with self.lock:
            self._health = {}
            clusters = self.clusters()
            for attempt in self.state.active_attempts():
                try:
                    self._watch(attempt, clusters[attempt.cluster], now)
                except Exception as exc:  # one misbehaving cluster must not stall the others
                    log.warning("job %s attempt %d: %s", attempt.job_id, attempt.attempt, exc)
            for attempt in self.state.preparing_attempts():
                self._advance_copy(attempt, clusters, now)
            self._watch_leases(clusters, now)
            self._return_home(clusters, now)
            self._place_pending(clusters, now)

    def _watch_leases(self, clusters: dict[str, ClusterView], now: float) -> None:
        """Drain every job on a lease early enough that its save ends before the lease does."""
        for attempt in self.state.active_attempts():
            cluster = clusters.get(attempt.cluster)
            if cluster is None or cluster.kind != "leased" or cluster.lease_end is None:
                continue
            job = self._job(attempt.job_id)
            left = cluster.lease_end - now
            if job.state != JobState.RUNNING:
                continue
            # The drain must leave time for its save: the last one the job made, measured.
            last = run_files(cluster, job.job_id, attempt.attempt).last_save()
            save_s = (last or {}).get("seconds") or 0.0
            margin = _placement(job)["lease_drain_margin_s"]
            if left <= margin + save_s:
                cause = (
                    f"lease on {cluster.name} ends in {max(0.0, left):.0f}s; draining to move on "
                    f"(its save takes {save_s:.1f}s, margin {margin:.0f}s)"
                )
                self._settle(job.job_id, JobState.DRAINING, cause, now, attempt.attempt)

    def _return_home(self, clusters: dict[str, ClusterView], now: float) -> None:
        """placement.return_home: a job on a lease moves to an owned cluster that has room."""
        if self.state.list_jobs({JobState.PENDING, JobState.MIGRATING}):
            return  # queued jobs get owned room first; no move while a placement is in flight
        for attempt in self.state.active_attempts():
            job = self._job(attempt.job_id)
            cluster = clusters.get(attempt.cluster)
            if (
                cluster is None
                or cluster.kind != "leased"
                or job.state != JobState.RUNNING
                or attempt.state != AttemptState.RUNNING
                or not _placement(job)["return_home"]
            ):
                continue
            accepted = self._order(job)
            owned = [c for c in accepted if c in clusters and clusters[c].kind == "owned"]
            if not owned:
                continue
            request = dataclasses.replace(job_request(job), clusters=tuple(owned))
            decision = place([request], [self._snapshot(clusters[c]) for c in owned], now)[0]
            if isinstance(decision, Placement):
                home = decision.cluster
                # Owned first, then where it runs now, should someone else take that room first.
                self.state.set_next_clusters(
                    job.job_id, [home, *[c for c in accepted if c != home]]
                )
                cause = f"room on {home} (owned): leaving the lease on {cluster.name}"
                self._settle(job.job_id, JobState.DRAINING, cause, now, attempt.attempt)
                return  # one move per tick: the next decision must see this one's effect

    def _watch(self, attempt: AttemptRecord, cluster: ClusterView, now: float) -> None:
        job = self._job(attempt.job_id)
        health = self._probe(cluster)
        if job.state == JobState.CANCELLED:
            self._stop_cancelled(job, attempt, cluster, health, now)
            return
        if not health.reachable:
            self._backends.pop(cluster.name, None)
            since = self._unreachable_since.setdefault(cluster.name, now)
            if now - since >= self.fleet_cfg.lost_after_s:
                what = f"{cluster.name} unreachable for {now - since:.0f}s ({health.error})"
                self._lose(job, attempt, cluster, what, now, cluster_lost=True)
            return
        self._unreachable_since.pop(cluster.name, None)
        backend = self.backend(cluster)
        if cluster.kind == "leased" and cluster.lease_end is not None and now >= cluster.lease_end:
            if attempt.ray_job_id:
                backend.stop(attempt.ray_job_id)  # the partner would kill it; do it in order
            what = f"the lease on {cluster.name} ended while attempt {attempt.attempt} ran"
            self._lose(job, attempt, cluster, what, now, cluster_lost=True)
            return
        ray_job_id = attempt.ray_job_id
        if ray_job_id is None:
            # The controller died between recording this attempt and hearing back from submit.
            ray_job_id = submission_id(job.job_id, attempt.attempt)
            if not backend.exists(ray_job_id):
                backend.submit(self._spec(job, cluster, attempt))
            self.state.update_attempt(job.job_id, attempt.attempt, ray_job_id=ray_job_id)
        status = str(backend.status(ray_job_id))
        if job.state == JobState.DRAINING and status in ("PENDING", "RUNNING"):
            timeout = _placement(job)["drain_timeout_s"]
            if attempt.interrupted_at is None:
                run_files(cluster, job.job_id, attempt.attempt).request_drain(job.reason or "")
                self.state.update_attempt(job.job_id, attempt.attempt, interrupted_at=now)
            elif now - attempt.interrupted_at > timeout:
                backend.stop(ray_job_id)
                what = (
                    f"attempt {attempt.attempt} did not acknowledge its drain within {timeout:.0f}s"
                )
                self._lose(job, attempt, cluster, what, now, cluster_lost=False)
                return
        if status == "RUNNING" and attempt.state == AttemptState.SUBMITTED:
            self.state.update_attempt(
                job.job_id, attempt.attempt, state=AttemptState.RUNNING, started_at=now
            )
            self._settle(
                job.job_id, JobState.RUNNING, f"running on {cluster.name}", now, attempt.attempt
            )
        if status == "RUNNING" and attempt.first_step_at is None:
            steps = self._steps(cluster, job.job_id, attempt)
            if steps:
                self.state.update_attempt(job.job_id, attempt.attempt, **steps)
        elif status in ("SUCCEEDED", "FAILED", "STOPPED"):
            self._finish(job, attempt, cluster, backend, ray_job_id, status, now)

    def _stop_cancelled(self, job, attempt, cluster, health, now) -> None:
        """The user's cancel is recorded; make the cluster match it."""
        if health.reachable and attempt.ray_job_id:
            backend = self.backend(cluster)
            if backend.status(attempt.ray_job_id) not in TERMINAL:
                backend.stop(attempt.ray_job_id)
        self.state.update_attempt(
            job.job_id,
            attempt.attempt,
            state=AttemptState.STOPPED,
            ended_at=now,
            exit_reason="cancelled by the user",
            **self._steps(cluster, job.job_id, attempt),
        )

    def _finish(self, job, attempt, cluster, backend, ray_job_id, status, now) -> None:
        info = backend.info(ray_job_id)
        code = info.exit_code
        outcome = classify(status, code, list(_placement(job)["user_error_exit_codes"]))
        fields = self._ended(job, attempt, cluster, now)
        fields["exit_reason"] = info.message
        at = f" after step {fields['last_step']}" if fields.get("last_step") else ""
        where = f"attempt {attempt.attempt} on {cluster.name}"
        if outcome == Outcome.SUCCEEDED:
            self.state.update_attempt(
                job.job_id, attempt.attempt, state=AttemptState.SUCCEEDED, **fields
            )
            cause = f"finished on {cluster.name}"
            self._settle(job.job_id, JobState.SUCCEEDED, cause, now, attempt.attempt)
        elif outcome == Outcome.DRAINED:
            why = ""
            if job.state != JobState.DRAINING:
                # Not our request: a SIGTERM from outside, the partner taking its nodes back.
                # Move on, to this cluster only if nothing else has room.
                ack = self._ack(cluster, job.job_id, attempt.attempt)
                why = f" ({ack.get('reason', 'SIGTERM')})"
                fields["interrupted_at"] = attempt.interrupted_at or ack.get("at", now)
                order = self._order(job)
                moved = [c for c in order if c != cluster.name] + [cluster.name]
                self.state.set_next_clusters(job.job_id, moved)
            self.state.update_attempt(
                job.job_id, attempt.attempt, state=AttemptState.DRAINED, **fields
            )
            cause = f"drained on {cluster.name}{at}{why}; back to the queue with its checkpoint"
            self._settle(job.job_id, JobState.PENDING, cause, now, attempt.attempt)
        elif outcome == Outcome.NO_CAPACITY:
            self.state.update_attempt(
                job.job_id, attempt.attempt, state=AttemptState.FAILED, **fields
            )
            cause = f"{cluster.name} could not reserve {attempt.world_size} device(s); back to the queue"
            self._settle(job.job_id, JobState.PENDING, cause, now, attempt.attempt)
        elif outcome == Outcome.USER_ERROR:
            self.state.update_attempt(
                job.job_id, attempt.attempt, state=AttemptState.FAILED, **fields
            )
            cause = (
                f"{where} failed with exit code {code}, a user error "
                f"(placement.user_error_exit_codes): {info.message}"
            )
            self._settle(job.job_id, JobState.FAILED, cause, now, attempt.attempt)
        else:
            fields.setdefault("interrupted_at", attempt.interrupted_at or now)
            ended = AttemptState.STOPPED if status == "STOPPED" else AttemptState.FAILED
            self.state.update_attempt(job.job_id, attempt.attempt, state=ended, **fields)
            meaning = exit_codes.RESERVED.get(code)
            what = f"{where} {status.lower()}{at} (exit code {code}{', ' + meaning if meaning else ''})"
            # A cluster whose environment cannot run Spillway is left as if lost.
            lost = cluster_at_fault(outcome)
            self._recover(job, attempt, cluster, what, now, cluster_lost=lost)

    def _lose(self, job, attempt, cluster, what: str, now: float, cluster_lost: bool) -> None:
        """End an attempt we could not hear end (cluster gone, lease over, drain ignored)."""
        fields = self._ended(job, attempt, cluster, now)
        self.state.update_attempt(
            job.job_id,
            attempt.attempt,
            state=AttemptState.LOST,
            exit_reason=what,
            interrupted_at=attempt.interrupted_at or now,
            **fields,
        )
        self._recover(job, attempt, cluster, what, now, cluster_lost)

    def _recover(self, job, attempt, cluster, what: str, now: float, cluster_lost: bool) -> None:
        placement = _placement(job)
        restarts = self.state.count_restart(job.job_id)
        order = self._order(job)
        plan = recover(
            placement["recovery"],
            cluster.name,
            order,
            cluster_lost,
            restarts,
            placement["max_restarts"],
            what,
        )
        if plan.give_up:
            self._settle(job.job_id, JobState.FAILED, plan.cause, now, attempt.attempt)
            return
        self.state.set_next_clusters(job.job_id, plan.next_clusters)
        self._settle(job.job_id, JobState.PENDING, plan.cause, now, attempt.attempt)

    def _ended(self, job, attempt, cluster, now: float) -> dict:
        """Steps reached and cost of an attempt that has just ended; the job's cost grows too."""
        hours = (now - (attempt.started_at or attempt.submitted_at or attempt.created_at)) / 3600
        cost = hours * attempt.world_size * cluster.cost_per_device_hour
        self.state.add_cost(job.job_id, cost)
        try:  # the catalog: what this attempt left committed on its cluster's store
            found = migration.committed_sizes(cluster, job.job_id)
            url = checkpoints_url(cluster, job.job_id)
            self.state.sync_checkpoints(job.job_id, cluster.name, url, found, now)
        except Exception as exc:  # a store gone with its cluster: the catalog keeps what it knew
            log.warning("job %s: cannot list checkpoints on %s: %s", job.job_id, cluster.name, exc)
        return dict(ended_at=now, cost=cost, **self._steps(cluster, job.job_id, attempt))

    def _settle(self, job_id: str, to: JobState, cause: str, now: float, attempt: int) -> None:
        """Move a live job to `to`; a job the user cancelled meanwhile keeps its CANCELLED."""
        try:
            self.state.transition(job_id, to, cause, now, attempt, expect=ACTIVE)
        except InvalidTransition:
            log.info("job %s stays %s: %s", job_id, self._job(job_id).state.value, cause)

    def _steps(self, cluster: ClusterView, job_id: str, attempt: AttemptRecord) -> dict:
        """First and last step of an attempt from its metrics, and the steps it redid."""
        try:
            lines = run_files(cluster, job_id, attempt.attempt).read_metrics()
        except OSError:
            lines = []
        if not lines:
            return {}
        first = lines[0]["step"]
        fields = dict(first_step=first, last_step=lines[-1]["step"])
        if "time" in lines[0]:
            fields["first_step_at"] = lines[0]["time"]
        before = [
            a.last_step
            for a in self.state.attempts(job_id)
            if a.attempt < attempt.attempt and a.last_step is not None
        ]
        if before:
            fields["steps_redone"] = max(0, max(before) - first + 1)
        return fields

    def _ack(self, cluster: ClusterView, job_id: str, attempt: int) -> dict:
        try:
            return run_files(cluster, job_id, attempt).drain_ack() or {}
        except OSError:
            return {}

    # ---- placement ----------------------------------------------------------------------

    def _place_pending(self, clusters: dict[str, ClusterView], now: float) -> None:
        pending = self.state.list_jobs({JobState.PENDING})
        if not pending:
            return
        snapshots = [self._snapshot(c) for c in clusters.values()]
        decisions = place([job_request(j) for j in pending], snapshots, now)
        if not any(isinstance(d, Placement) for d in decisions):
            self._preempt(pending, snapshots, now)
        for decision in decisions:
            if not isinstance(decision, Placement):
                self.state.set_reason(decision.job_id, decision.reason, now)
                continue
            job = self._job(decision.job_id)
            target = clusters[decision.cluster]
            sources = self._sources(job, target, clusters)
            if sources and sources[0].cluster != target.name:
                self._prepare(job, target, decision.world_size, sources[0], now)
            else:
                resumed = sources[0].step if sources else None
                self._start(job, target, decision.world_size, now, resumed)

    def _preempt(self, pending: list[JobRecord], snapshots: list, now: float) -> None:
        """Drain lower-priority jobs where a waiting job of higher priority would then fit.

        Only on a tick that placed nothing, and never while any job drains: the snapshots would
        not show the devices already on their way back.
        """
        if self.state.list_jobs({JobState.DRAINING}):
            return
        running = []
        for attempt in self.state.active_attempts():
            job = self._job(attempt.job_id)
            if job.state == JobState.RUNNING:
                started = attempt.started_at or attempt.created_at
                running.append(
                    Running(job.job_id, attempt.cluster, attempt.world_size, job.priority, started)
                )
        if not running:
            return
        waiting = [job_request(j) for j in pending]
        for plan in preemptions(waiting, running, snapshots, now):
            winner = self._job(plan.job_id)
            for victim_id in plan.victims:
                victim = self._job(victim_id)
                cause = (
                    f"preempted on {plan.cluster} by {winner.job_id} (priority {winner.priority} "
                    f"over {victim.priority}); back to the queue with its checkpoint"
                )
                attempt = self.state.latest_attempt(victim_id)
                self._settle(victim_id, JobState.DRAINING, cause, now, attempt.attempt)
            self.state.add_event(
                winner.job_id,
                "preempt",
                f"draining {', '.join(plan.victims)} on {plan.cluster} to make room",
                now,
            )

    def _sources(
        self, job: JobRecord, target: ClusterView, clusters: dict[str, ClusterView]
    ) -> list[migration.Source]:
        """The job's committed checkpoints on every cluster it ran on (and the target)."""
        visited = [a.cluster for a in reversed(self.state.attempts(job.job_id))]
        names = list(dict.fromkeys([*visited, target.name]))
        views = [clusters[n] for n in names if n in clusters]
        return migration.checkpoint_sources(job.job_id, views, target.name, log.warning)

    def _snapshot(self, cluster: ClusterView) -> ClusterSnapshot:
        used = self.state.devices_in_use(cluster.name)
        lease = (cluster.lease_start, cluster.lease_end)
        if cluster.kind == "leased" and None in lease:
            # A local lease whose cluster never came up has not begun: an empty window.
            lease = (0.0, 0.0)
        return ClusterSnapshot(
            name=cluster.name,
            kind=cluster.kind,
            device_type=cluster.device_type,
            devices_total=cluster.devices,
            devices_free=max(0, cluster.devices - used),
            cost_per_device_hour=cluster.cost_per_device_hour,
            lease_start=lease[0],
            lease_end=lease[1],
            reachable=cluster.running and self._probe(cluster).reachable,
        )

    # ---- migration: the checkpoint goes first, then the attempt -------------------------

    def _prepare(self, job, target, world_size: int, newest: migration.Source, now) -> None:
        """Hold the target's devices with a PREPARING attempt while the checkpoint is copied."""
        attempt = self.state.add_attempt(
            job.job_id, target.name, world_size, now, state=AttemptState.PREPARING
        )
        cause = (
            f"placed on {target.name} ({target.kind}) with {world_size} device(s); "
            f"copying checkpoint step {newest.step} from {newest.cluster} first"
        )
        self.state.transition(job.job_id, JobState.MIGRATING, cause, now, attempt.attempt)
        copying = self._start_copy(attempt)
        # A small checkpoint is across in well under a tick: start it now rather than next tick.
        copying.join(timeout=COPY_INLINE_WAIT_S)
        if not copying.is_alive():
            again = self.state.get_attempt(job.job_id, attempt.attempt)
            if again.state == AttemptState.PREPARING:
                self._advance_copy(again, {target.name: target}, now)

    def _advance_copy(
        self, attempt: AttemptRecord, clusters: dict[str, ClusterView], now: float
    ) -> None:
        key = (attempt.job_id, attempt.attempt)
        job = self._job(attempt.job_id)
        copying = self._copies.get(key)
        if job.state == JobState.CANCELLED:
            self.state.update_attempt(
                job.job_id,
                attempt.attempt,
                state=AttemptState.STOPPED,
                ended_at=now,
                exit_reason="cancelled by the user while its checkpoint was copied",
            )
            return
        if copying is not None and copying.is_alive():
            return
        if attempt.copy_s is not None:  # verified and committed on the target
            self._copies.pop(key, None)
            self._submit(job, clusters[attempt.cluster], attempt, now)
            return
        # A copy that never ran here: this controller restarted mid-migration.
        self.state.add_event(
            job.job_id,
            "migrate",
            f"resuming the checkpoint copy to {attempt.cluster}",
            now,
            attempt.attempt,
        )
        self._start_copy(attempt)

    def _start_copy(self, attempt: AttemptRecord) -> threading.Thread:
        thread = threading.Thread(
            target=self._copy,
            args=(attempt.job_id, attempt.attempt),
            name=f"copy-{attempt.job_id}-a{attempt.attempt}",
            daemon=True,
        )
        self._copies[(attempt.job_id, attempt.attempt)] = thread
        thread.start()
        return thread

    def _copy(self, job_id: str, number: int) -> None:
        """On its own thread, so a long copy never stalls the loop; the loop submits after."""
        job = self._job(job_id)
        attempt = self.state.get_attempt(job_id, number)
        clusters = self.clusters()
        target = clusters[attempt.cluster]
        limit = _placement(job)["copy_limit_mb_s"]
        try:
            migration.copy_for_attempt(
                self.state,
                job_id,
                number,
                self._sources(job, target, clusters),
                target,
                limit * 1e6 if limit else None,
            )
        except Exception as exc:  # the copy failed after its retries: a fault like any other
            with self.lock:
                now = self.clock()
                what = f"checkpoint copy to {target.name} failed: {exc}"
                self.state.update_attempt(
                    job_id, number, state=AttemptState.FAILED, ended_at=now, exit_reason=what
                )
                self._recover(self._job(job_id), attempt, target, what, now, cluster_lost=False)

    # ---- submitting ---------------------------------------------------------------------

    def _spec(self, job: JobRecord, cluster: ClusterView, attempt: AttemptRecord) -> AttemptSpec:
        """The attempt's spec, once the run config it trains is in its run dir: every submit
        (a resubmit after a restart too) comes through here, so none goes out without it."""
        run_dir = attempt_dir(cluster, job.job_id, attempt.attempt)
        cfg = attempt_run_config(
            json.loads(job.run_config),
            world_size=attempt.world_size,
            run_dir=run_dir,
            checkpoint_storage=checkpoints_url(cluster, job.job_id),
        )
        try:
            run_files(cluster, job.job_id, attempt.attempt).write_run_config(cfg)
        except Exception as exc:
            raise RuntimeError(f"cannot write the run config to {run_dir}: {exc}") from exc
        return AttemptSpec(
            job_id=job.job_id,
            attempt=attempt.attempt,
            world_size=attempt.world_size,
            device_resource=cluster.device_resource,
            run_dir=run_dir,
        )

    def _start(
        self, job: JobRecord, cluster: ClusterView, world_size: int, now: float, resumed
    ) -> None:
        attempt = self.state.add_attempt(job.job_id, cluster.name, world_size, now, resumed)
        cause = f"placed on {cluster.name} ({cluster.kind}) with {world_size} device(s)"
        self.state.transition(job.job_id, JobState.STARTING, cause, now, attempt.attempt)
        self._hand_over(job, cluster, attempt, now)

    def _submit(self, job: JobRecord, cluster: ClusterView, attempt: AttemptRecord, now) -> None:
        """A PREPARING attempt whose checkpoint is in place goes to its cluster."""
        self.state.update_attempt(job.job_id, attempt.attempt, state=AttemptState.SUBMITTED)
        cause = f"checkpoint in place on {cluster.name}; starting attempt {attempt.attempt}"
        self._settle(job.job_id, JobState.STARTING, cause, now, attempt.attempt)
        self._hand_over(job, cluster, attempt, now)

    def _hand_over(self, job, cluster, attempt, now) -> None:
        try:
            ray_job_id = self.backend(cluster).submit(self._spec(job, cluster, attempt))
        except Exception as exc:
            self.state.update_attempt(
                job.job_id,
                attempt.attempt,
                state=AttemptState.FAILED,
                ended_at=now,
                exit_reason=str(exc),
            )
            cause = f"submit to {cluster.name} failed: {exc}"
            self._settle(job.job_id, JobState.PENDING, cause, now, attempt.attempt)
            return
        self.state.update_attempt(
            job.job_id, attempt.attempt, ray_job_id=ray_job_id, submitted_at=self.clock()
        )
        self.state.add_event(
            job.job_id, "submit", f"submitted {ray_job_id} to {cluster.name}", now, attempt.attempt
        )
