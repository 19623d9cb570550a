"""The reconcile loop: watch every attempt, place pending jobs, submit; nothing twice.

All durable facts live in ControllerState, so a controller that dies and comes back reloads
them and carries on: attempts still running are polled by their Ray submission id, and an
attempt recorded but perhaps never submitted is looked up by its deterministic id first.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from omegaconf import DictConfig

from orchestrator.backends.ray_jobs import RayJobsBackend, submission_id
from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.storage import open_root
from orchestrator.checkpoint.transfer import copy_checkpoint
from orchestrator.controller.job_states import AttemptState, JobState
from orchestrator.controller.jobs import job_request
from orchestrator.controller.requests import ACTIVE
from orchestrator.controller.state import (
    AttemptRecord,
    ControllerState,
    InvalidTransition,
    JobRecord,
)
from orchestrator.fleet import fleet as fleet_mod
from orchestrator.fleet.fleet import ClusterView
from orchestrator.fleet.probe import probe
from orchestrator.runtime.drain import MARKER as DRAIN_MARKER
from orchestrator.runtime.drain import request_drain
from orchestrator.runtime.spec import EXIT_DRAINED, EXIT_NO_CAPACITY, AttemptSpec
from orchestrator.scheduling import ClusterSnapshot, Placement, place
from orchestrator.tracking.metrics import read_metrics

log = logging.getLogger("spillway.controller")


def job_root(cluster: ClusterView, job_id: str) -> str:
    return f"{cluster.storage_root.rstrip('/')}/jobs/{job_id}"


def attempt_dir(cluster: ClusterView, job_id: str, attempt: int) -> str:
    return f"{job_root(cluster, job_id)}/attempt-{attempt}"


def checkpoints_url(cluster: ClusterView, job_id: str) -> str:
    return f"{job_root(cluster, job_id)}/checkpoints"


class Controller:
    def __init__(self, state_dir: str, fleet_cfg: DictConfig) -> None:
        self.state_dir = state_dir
        self.fleet_cfg = fleet_cfg
        self.state = ControllerState.open(Path(state_dir) / "controller.db")
        # Requests from the CLI and the loop never interleave inside one decision.
        self.lock = threading.RLock()

    def clusters(self) -> dict[str, ClusterView]:
        return {v.name: v for v in fleet_mod.resolve(self.fleet_cfg, self.state_dir)}

    def _job(self, job_id: str) -> JobRecord:
        job = self.state.get_job(job_id)
        if job is None:
            raise KeyError(f"no job {job_id}")
        return job

    # ---- the loop -----------------------------------------------------------------------

    def reconcile(self, now: float) -> None:
        with self.lock:
            clusters = self.clusters()
            for attempt in self.state.active_attempts():
                try:
                    self._watch(attempt, clusters[attempt.cluster], now)
                except Exception as exc:  # one unreachable cluster must not stall the others
                    log.warning("job %s attempt %d: %s", attempt.job_id, attempt.attempt, exc)
            self._watch_leases(clusters, now)
            self._place_pending(clusters, now)

    def _watch_leases(self, clusters: dict[str, ClusterView], now: float) -> None:
        """Drain every job on a lease early enough that its save ends before the lease does."""
        for attempt in self.state.active_attempts():
            cluster = clusters.get(attempt.cluster)
            if cluster is None or cluster.kind != "leased" or cluster.lease_end is None:
                continue
            job = self._job(attempt.job_id)
            margin = json.loads(job.run_config)["placement"]["lease_drain_margin_s"]
            left = cluster.lease_end - now
            if job.state == JobState.RUNNING and left <= margin:
                cause = (
                    f"lease on {cluster.name} ends in {max(0.0, left):.0f}s; draining to move on"
                )
                self._settle(job.job_id, JobState.DRAINING, cause, now, attempt.attempt)

    def _watch(self, attempt: AttemptRecord, cluster: ClusterView, now: float) -> None:
        backend = RayJobsBackend(cluster)
        job_id = attempt.job_id
        ray_job_id = attempt.ray_job_id
        if self._job(job_id).state == JobState.CANCELLED:
            # The user's cancel is recorded; make the cluster match it.
            if ray_job_id and not backend.status(ray_job_id).is_terminal():
                backend.stop(ray_job_id)
            steps = [r["step"] for r in self._metrics(cluster, job_id, attempt.attempt)]
            self.state.update_attempt(
                job_id,
                attempt.attempt,
                state=AttemptState.STOPPED,
                ended_at=now,
                exit_reason="cancelled by the user",
                **({"first_step": steps[0], "last_step": steps[-1]} if steps else {}),
            )
            return
        if ray_job_id is None:
            # The controller died between recording this attempt and hearing back from submit.
            ray_job_id = submission_id(job_id, attempt.attempt)
            if not backend.exists(ray_job_id):
                backend.submit(self._spec(self._job(job_id), cluster, attempt))
            self.state.update_attempt(job_id, attempt.attempt, ray_job_id=ray_job_id)
        status = str(backend.status(ray_job_id))
        job = self._job(job_id)
        if job.state == JobState.DRAINING and status in ("PENDING", "RUNNING"):
            run_dir = attempt_dir(cluster, job_id, attempt.attempt)
            fs, path = open_root(run_dir)
            if not fs.exists(f"{path}/{DRAIN_MARKER}"):
                request_drain(run_dir, job.reason or "drain requested")
        if status == "RUNNING" and attempt.state == AttemptState.SUBMITTED:
            self.state.update_attempt(
                job_id, attempt.attempt, state=AttemptState.RUNNING, started_at=now
            )
            self._settle(
                job_id, JobState.RUNNING, f"running on {cluster.name}", now, attempt.attempt
            )
        elif status in ("SUCCEEDED", "FAILED", "STOPPED"):
            self._finish(job, attempt, cluster, backend, ray_job_id, status, now)

    def _finish(self, job, attempt, cluster, backend, ray_job_id, status, now) -> None:
        steps = [r["step"] for r in self._metrics(cluster, job.job_id, attempt.attempt)]
        info = backend.client.get_job_info(ray_job_id)
        hours = (now - (attempt.started_at or attempt.created_at)) / 3600
        cost = hours * attempt.world_size * cluster.cost_per_device_hour
        fields = dict(ended_at=now, cost=cost, exit_reason=info.message)
        if steps:
            fields.update(first_step=steps[0], last_step=steps[-1])
        self.state.add_cost(job.job_id, cost)
        if status == "SUCCEEDED":
            self.state.update_attempt(
                job.job_id, attempt.attempt, state=AttemptState.SUCCEEDED, **fields
            )
            self._settle(
                job.job_id, JobState.SUCCEEDED, f"finished on {cluster.name}", now, attempt.attempt
            )
            return
        ended = AttemptState.STOPPED if status == "STOPPED" else AttemptState.FAILED
        self.state.update_attempt(job.job_id, attempt.attempt, state=ended, **fields)
        if f"exit code {EXIT_DRAINED}" in (info.message or ""):
            self.state.update_attempt(job.job_id, attempt.attempt, state=AttemptState.DRAINED)
            at = f" after step {steps[-1]}" if steps else ""
            cause = f"drained on {cluster.name}{at}; back to the queue with its checkpoint"
            self._settle(job.job_id, JobState.PENDING, cause, now, attempt.attempt)
        elif f"exit code {EXIT_NO_CAPACITY}" in (info.message or ""):
            cause = f"{cluster.name} could not reserve {attempt.world_size} device(s); back to the queue"
            self._settle(job.job_id, JobState.PENDING, cause, now, attempt.attempt)
        else:
            cause = f"attempt {attempt.attempt} on {cluster.name} {status.lower()}: {info.message}"
            self._settle(job.job_id, JobState.FAILED, cause, now, attempt.attempt)

    def _settle(self, job_id: str, to: JobState, cause: str, now: float, attempt: int) -> None:
        """Move a live job to `to`; a job the user cancelled meanwhile keeps its CANCELLED."""
        try:
            self.state.transition(job_id, to, cause, now, attempt, expect=ACTIVE)
        except InvalidTransition:
            log.info("job %s stays %s: %s", job_id, self._job(job_id).state.value, cause)

    def _metrics(self, cluster: ClusterView, job_id: str, attempt: int) -> list[dict]:
        path = Path(attempt_dir(cluster, job_id, attempt)) / "metrics.jsonl"
        return read_metrics(path) if path.exists() else []

    def _place_pending(self, clusters: dict[str, ClusterView], now: float) -> None:
        pending = self.state.list_jobs({JobState.PENDING})
        if not pending:
            return
        snapshots = [self._snapshot(c) for c in clusters.values()]
        for decision in place([job_request(j) for j in pending], snapshots, now):
            if isinstance(decision, Placement):
                job = self._job(decision.job_id)
                try:
                    self._bring_checkpoint(job, clusters[decision.cluster], clusters, now)
                except Exception as exc:  # never start without the checkpoint it should resume
                    self.state.set_reason(
                        job.job_id, f"checkpoint copy to {decision.cluster} failed: {exc}", now
                    )
                    continue
                self._start(job, clusters[decision.cluster], decision.world_size, now)
            else:
                self.state.set_reason(decision.job_id, decision.reason, now)

    def _snapshot(self, cluster: ClusterView) -> ClusterSnapshot:
        used = self.state.devices_in_use(cluster.name)
        return ClusterSnapshot(
            name=cluster.name,
            kind=cluster.kind,
            device_type=cluster.device_type,
            devices_total=cluster.devices,
            devices_free=max(0, cluster.devices - used),
            cost_per_device_hour=cluster.cost_per_device_hour,
            lease_start=cluster.lease_start,
            lease_end=cluster.lease_end,
            reachable=cluster.running and probe(cluster).reachable,
        )

    def _bring_checkpoint(
        self, job: JobRecord, target: ClusterView, clusters: dict[str, ClusterView], now: float
    ) -> None:
        """A job moving to another cluster takes its latest committed checkpoint along, verified."""
        last = self.state.latest_attempt(job.job_id)
        if last is None or last.cluster == target.name:
            return
        src, dst = (
            checkpoints_url(clusters[last.cluster], job.job_id),
            checkpoints_url(target, job.job_id),
        )
        fs, root = open_root(src)
        found = catalog.latest_verified(fs, root, warn=log.warning)
        if found is None:
            return  # nothing committed yet: the new attempt starts from step 0, as the old one did
        # The step verified here, not whatever is newest: a newer one that fails its hashes stays behind.
        copied = copy_checkpoint(src, dst, found[0])
        if copied.bytes == 0:
            return  # already there and verified (a controller restarted mid-migration)
        self.state.record_checkpoint(
            job.job_id, copied.step, target.name, dst, copied.bytes, True, now
        )
        cause = (
            f"copied checkpoint step {copied.step} from {last.cluster} to {target.name}: "
            f"{copied.bytes} bytes in {copied.seconds:.2f}s ({copied.bytes_per_s / 1e6:.1f} MB/s), verified"
        )
        self.state.add_event(job.job_id, "migrate", cause, now)

    def _spec(self, job: JobRecord, cluster: ClusterView, attempt: AttemptRecord) -> AttemptSpec:
        return AttemptSpec(
            job_id=job.job_id,
            attempt=attempt.attempt,
            world_size=attempt.world_size,
            device_resource=cluster.device_resource,
            run_dir=attempt_dir(cluster, job.job_id, attempt.attempt),
            overrides=[
                *job.overrides,
                f"resources.devices={attempt.world_size}",
                f"run_dir={attempt_dir(cluster, job.job_id, attempt.attempt)}",
                f"checkpoint.storage={checkpoints_url(cluster, job.job_id)}",
            ],
        )

    def _start(self, job: JobRecord, cluster: ClusterView, world_size: int, now: float) -> None:
        attempt = self.state.add_attempt(job.job_id, cluster.name, world_size, now)
        cause = f"placed on {cluster.name} ({cluster.kind}) with {world_size} device(s)"
        self.state.transition(job.job_id, JobState.STARTING, cause, now, attempt.attempt)
        try:
            ray_job_id = RayJobsBackend(cluster).submit(self._spec(job, cluster, attempt))
        except Exception as exc:
            self.state.update_attempt(
                job.job_id,
                attempt.attempt,
                state=AttemptState.FAILED,
                ended_at=now,
                exit_reason=str(exc),
            )
            self.state.transition(
                job.job_id, JobState.PENDING, f"submit to {cluster.name} failed: {exc}", now
            )
            return
        self.state.update_attempt(job.job_id, attempt.attempt, ray_job_id=ray_job_id)
        self.state.add_event(
            job.job_id, "submit", f"submitted {ray_job_id} to {cluster.name}", now, attempt.attempt
        )
