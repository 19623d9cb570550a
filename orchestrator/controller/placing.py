"""How the controller places jobs and moves them: placement, preemption, leases, budgets,
return home, the checkpoint copy that goes first, and the submit that comes last.

Decisions come from scheduling/ (pure); each is applied in one transaction, and the calls to
clusters it needs are queued on their lanes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from concurrent.futures import Future

from orchestrator.backends.base import BackendError, submission_id
from orchestrator.checkpoint.fence import write_fence
from orchestrator.controller import migration
from orchestrator.controller.job_states import AttemptState, JobState
from orchestrator.controller.jobs import job_request
from orchestrator.controller.lanes import storage_lane
from orchestrator.controller.paths import attempt_dir, checkpoints_url, fence_url, run_files
from orchestrator.controller.state import AttemptRecord, JobRecord
from orchestrator.fleet.fleet import ClusterView
from orchestrator.runtime.spec import AttemptSpec, attempt_run_config
from orchestrator.scheduling import (
    ClusterSnapshot,
    Placement,
    hold_past_unknown,
    loss,
    place,
)
from orchestrator.scheduling.budget import budget_cause, over_budget
from orchestrator.scheduling.home import AwayRun, return_home_moves
from orchestrator.scheduling.leases import OnLease, lease_drains
from orchestrator.scheduling.preemption import Running, preemptions
from orchestrator.scheduling.types import cluster_snapshot

log = logging.getLogger("spillway.controller")

# How long placement waits for a copy before leaving it to its thread and the next ticks.
COPY_INLINE_WAIT_S = 1.0


def _placement(job: JobRecord) -> dict:
    return json.loads(job.run_config)["placement"]


def _failed_before_start(tx, job_id: str, attempt: int, why: str, now: float) -> None:
    """An attempt that never ran (its copy or its submit failed): ended, and its devices free
    at once, since no cluster runs it."""
    tx.update_attempt(
        job_id, attempt, state=AttemptState.FAILED, ended_at=now, released_at=now, exit_reason=why
    )


class PlacingMixin:
    """Part of Controller (controller.py): placing, moving and submitting."""

    # ---- leases, budgets, return home ---------------------------------------------------

    def _watch_leases(self, clusters: dict[str, ClusterView], now: float) -> None:
        """Drain every job on a lease early enough that its save ends before the lease does."""
        on_lease, attempts = [], {}
        for attempt in self.state.active_attempts():
            cluster = clusters.get(attempt.cluster)
            if cluster is None or cluster.kind != "leased" or cluster.lease_end is None:
                continue
            job = self._job(attempt.job_id)
            if job.state != JobState.RUNNING:
                continue
            seen = self._seen_attempt(attempt)
            # The drain must leave time for its save: the last one the job made, measured.
            save_s = ((seen.last_save if seen else None) or {}).get("seconds") or 0.0
            margin = _placement(job)["lease_drain_margin_s"]
            on_lease.append(OnLease(job.job_id, cluster.name, margin, save_s))
            attempts[job.job_id] = (job, attempt)
        ends = {c.name: c.lease_end for c in clusters.values() if c.lease_end is not None}
        for job_id, cause in lease_drains(on_lease, ends, now):
            self._drain(*attempts[job_id], cause, now)

    def _watch_budgets(self, clusters: dict[str, ClusterView], now: float) -> None:
        """A job drains when what it spent, with what its running attempt has spent so far
        and what the drain's save will cost, reaches its budget: at the budget, not after."""
        for attempt in self.state.active_attempts():
            job = self._job(attempt.job_id)
            cluster = clusters.get(attempt.cluster)
            if job.budget is None or job.state != JobState.RUNNING or cluster is None:
                continue
            rate = attempt.world_size * cluster.cost_per_device_hour / 3600
            running = (now - (attempt.started_at or attempt.created_at)) * rate
            seen = self._seen_attempt(attempt)
            save_s = ((seen.last_save if seen else None) or {}).get("seconds") or 0.0
            if over_budget(job.cost_so_far, running, job.budget, save_s * rate):
                cause = budget_cause(job.cost_so_far, running, job.budget, save_s * rate)
                # Back to the queue with its checkpoint, where the policy's budget check holds it.
                self._drain(job, attempt, cause, now)

    def _drain(self, job: JobRecord, attempt: AttemptRecord, cause: str, now: float) -> None:
        with self.state.decision() as tx:
            self._settle(tx, job.job_id, JobState.DRAINING, cause, now, attempt.attempt)
        self._ask_to_drain(job.job_id, attempt, now)

    def _ask_to_drain(self, job_id: str, attempt: AttemptRecord, now: float) -> None:
        """The drain request written now, not a tick later: a run of a few seconds has no
        tick to spare. The watch asks again if this write is lost (a restart, a failure)."""
        job = self._job(job_id)
        cluster = self.clusters().get(attempt.cluster)
        if job.state == JobState.DRAINING and cluster is not None:
            self._request_drain(job, attempt, cluster, now)

    def _return_home(
        self, clusters: dict[str, ClusterView], verdicts: dict[str, str], now: float
    ) -> None:
        """placement.return_home: a job on a lease moves to an owned cluster that has room,
        unless a job waiting for that same owned cluster would take the room first."""
        away, attempts = [], {}
        for attempt in self.state.active_attempts():
            job = self._job(attempt.job_id)
            cluster = clusters.get(attempt.cluster)
            if (
                cluster is not None
                and cluster.kind == "leased"
                and job.state == JobState.RUNNING
                and attempt.state == AttemptState.RUNNING
                and _placement(job)["return_home"]
            ):
                own = dataclasses.replace(job_request(job), clusters=tuple(self._order(job)))
                away.append(AwayRun(own, cluster.name))
                attempts[job.job_id] = (job, attempt)
        if not away:
            return
        waiting = [
            job_request(j) for j in self.state.list_jobs({JobState.PENDING, JobState.MIGRATING})
        ]
        moving_to = {
            j.next_clusters[0] for j in self.state.list_jobs({JobState.DRAINING}) if j.next_clusters
        }
        owned = [self._snapshot(c, verdicts) for c in clusters.values() if c.kind == "owned"]
        for move in return_home_moves(away, owned, waiting, now, moving_to):
            job, attempt = attempts[move.job_id]
            accepted = self._order(job)
            with self.state.decision() as tx:
                # Owned first, then where it runs now, should someone take that room first.
                tx.set_next_clusters(job.job_id, [move.to, *[c for c in accepted if c != move.to]])
                self._settle(tx, job.job_id, JobState.DRAINING, move.cause, now, attempt.attempt)
            self._ask_to_drain(job.job_id, attempt, now)

    # ---- placement ----------------------------------------------------------------------

    def _place_pending(
        self, clusters: dict[str, ClusterView], verdicts: dict[str, str], now: float
    ) -> None:
        pending = self.state.list_jobs({JobState.PENDING})
        if not pending:
            return
        unknown = {n for n in clusters if not loss.known(self._loss.get(n), verdicts.get(n))}
        snapshots = [self._snapshot(c, verdicts) for c in clusters.values()]
        requests = [job_request(j) for j in pending]
        decisions = hold_past_unknown(
            place(requests, snapshots, now), requests, snapshots, unknown, now
        )
        self._preempt(pending, snapshots, decisions, now)
        # Every waiting job's reason in one transaction: a long queue is one commit a tick,
        # and a reason that did not change writes nothing.
        with self.state.decision() as tx:
            for d in decisions:
                if not isinstance(d, Placement):
                    tx.set_reason(d.job_id, d.reason, now, getattr(d, "detail", None))
        for decision in decisions:
            if not isinstance(decision, Placement):
                continue
            job = self._job(decision.job_id)
            target = clusters[decision.cluster]
            sources = self._sources(job, target, clusters)
            if sources and sources[0].cluster != target.name:
                self._prepare(job, target, decision.world_size, sources[0], now)
            else:
                resumed = sources[0].step if sources else None
                self._start(job, target, decision.world_size, now, resumed)

    def _preempt(self, pending: list[JobRecord], snapshots: list, decisions, now: float) -> None:
        """Drain lower-priority jobs where a waiting job of higher priority would then fit.

        Every tick, beside what this tick placed (scheduling.preemption subtracts it), and
        never on a cluster whose devices are already on their way back from a drain."""
        running, returning = [], {}
        for attempt in self.state.active_attempts():
            job = self._job(attempt.job_id)
            if job.state == JobState.RUNNING:
                started = attempt.started_at or attempt.created_at
                running.append(
                    Running(job.job_id, attempt.cluster, attempt.world_size, job.priority, started)
                )
            elif job.state == JobState.DRAINING:
                returning[attempt.cluster] = returning.get(attempt.cluster, 0) + attempt.world_size
        if not running:
            return
        waiting = [job_request(j) for j in pending]
        plans = preemptions(
            waiting, running, snapshots, now, decided=decisions, returning=returning
        )
        for plan in plans:
            winner = self._job(plan.job_id)
            with self.state.decision() as tx:
                for victim_id in plan.victims:
                    victim = self._job(victim_id)
                    cause = (
                        f"preempted on {plan.cluster} by {winner.job_id} (priority "
                        f"{winner.priority} over {victim.priority}); back to the queue with "
                        "its checkpoint"
                    )
                    attempt = self.state.latest_attempt(victim_id)
                    self._settle(tx, victim_id, JobState.DRAINING, cause, now, attempt.attempt)
                tx.add_event(
                    winner.job_id,
                    "preempt",
                    f"draining {', '.join(plan.victims)} on {plan.cluster} to make room",
                    now,
                )

    def _sources(
        self, job: JobRecord, target: ClusterView, clusters: dict[str, ClusterView]
    ) -> list[migration.Source]:
        """The job's checkpoint line as the catalog recorded it, newest first."""
        return migration.line_sources(self.state.checkpoints(job.job_id), target.name, clusters)

    def _snapshot(self, cluster: ClusterView, verdicts: dict[str, str]) -> ClusterSnapshot:
        lease = (cluster.lease_start, cluster.lease_end)
        if cluster.kind == "leased" and None in lease:
            # A local lease whose cluster never came up has not begun: an empty window.
            lease = (0.0, 0.0)
        health = self._health(cluster.name)
        return cluster_snapshot(
            cluster.name,
            cluster,
            devices_used=self.state.devices_in_use(cluster.name),
            lease=lease,
            reachable=cluster.running
            and health is not None
            and health.reachable
            and verdicts.get(cluster.name) == "up",
        )

    # ---- migration: the checkpoint goes first, then the attempt -------------------------

    def _prepare(self, job, target, world_size: int, newest: migration.Source, now) -> None:
        """Hold the target's devices with a PREPARING attempt while the checkpoint is copied."""
        cause = (
            f"placed on {target.name} ({target.kind}) with {world_size} device(s); "
            f"copying checkpoint step {newest.step} from {newest.cluster} first"
        )
        with self.state.decision() as tx:
            attempt = tx.add_attempt(
                job.job_id, target.name, world_size, now, state=AttemptState.PREPARING
            )
            tx.transition(job.job_id, JobState.MIGRATING, cause, now, attempt.attempt)
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
                released_at=now,
                exit_reason="cancelled by the user while its checkpoint was copied",
            )
            return
        deadline = self.fleet_cfg.get("copy_deadline_s", 3600.0)
        if now - attempt.created_at > deadline:
            what = f"checkpoint copy to {attempt.cluster} still running after {deadline:.0f}s"
            self._copy_failed(job, attempt, what, now)
            return
        if copying is not None and copying.is_alive():
            return
        if attempt.copy_s is not None:  # verified and committed on the target
            self._copies.pop(key, None)
            target = clusters.get(attempt.cluster)
            if target is None:
                self._copy_failed(job, attempt, f"{attempt.cluster} left the fleet", now)
                return
            self._submit(job, target, attempt, now)
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

    def _copy_failed(self, job, attempt, what: str, now: float) -> None:
        with self.state.decision() as tx:
            _failed_before_start(tx, job.job_id, attempt.attempt, what, now)
            self._recover(tx, job, attempt, attempt.cluster, what, now, cluster_lost=False)

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
        """On its own thread, so a long copy never stalls the loop; the loop, woken when it
        ends, submits after."""
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
                self.clock,
            )
        except Exception as exc:  # the copy failed after its retries: a fault like any other
            with self.lock:
                current = self.state.get_attempt(job_id, number)
                if current.state == AttemptState.PREPARING:
                    what = f"checkpoint copy to {target.name} failed: {exc}"
                    self._copy_failed(self._job(job_id), current, what, self.clock())
        finally:
            self.wake()  # the loop submits (or recovers) now, not at its next tick

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
            epoch=attempt.epoch,
            fence_url=fence_url(cluster, job.job_id),
            # The controller names the step: a newer one beside it may be a zombie's.
            resume_step=attempt.resumed_from_step or 0,
            resume_verified=migration.copied_here(attempt),
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
            epoch=attempt.epoch,
        )

    def _start(
        self, job: JobRecord, cluster: ClusterView, world_size: int, now: float, resumed
    ) -> None:
        cause = f"placed on {cluster.name} ({cluster.kind}) with {world_size} device(s)"
        with self.state.decision() as tx:
            attempt = tx.add_attempt(job.job_id, cluster.name, world_size, now, resumed)
            tx.transition(job.job_id, JobState.STARTING, cause, now, attempt.attempt)
        self._hand_over(job, cluster, attempt)

    def _submit(self, job: JobRecord, cluster: ClusterView, attempt: AttemptRecord, now) -> None:
        """A PREPARING attempt whose checkpoint is in place goes to its cluster."""
        cause = f"checkpoint in place on {cluster.name}; starting attempt {attempt.attempt}"
        with self.state.decision() as tx:
            tx.update_attempt(job.job_id, attempt.attempt, state=AttemptState.SUBMITTED)
            self._settle(tx, job.job_id, JobState.STARTING, cause, now, attempt.attempt)
        self._hand_over(job, cluster, attempt)

    def _fence_everywhere(self, job: JobRecord, attempt: AttemptRecord) -> None:
        """Write the attempt's epoch into the job's folder on every cluster it has visited: an
        older attempt still running there stops at its next commit. Best effort on the others
        (a store that cannot be reached now cannot take a zombie's commit into the catalog
        either: only the current attempt's commits are recorded)."""
        clusters = self.clusters()
        visited = {a.cluster for a in self.state.attempts(job.job_id)}
        for name in sorted(visited - {attempt.cluster}):
            view = clusters.get(name)
            if view is None:
                continue
            self._fence(view, job.job_id, attempt.epoch, attempt.attempt)

    def _fence(self, cluster: ClusterView, job_id: str, epoch: int, attempt: int) -> None:
        """Queue the job's fence on the cluster's storage lane: only `epoch` may commit there."""
        url, options = fence_url(cluster, job_id), cluster.storage_options
        self._effect(
            storage_lane(cluster.name),
            f"fence-{job_id}-{epoch}",
            lambda: write_fence(url, options, epoch, attempt),
        )

    def _hand_over(self, job, cluster: ClusterView, attempt: AttemptRecord) -> None:
        """Queue the submit on the cluster's lane: fence, run config, then the submit, under
        the attempt's deterministic id. The attempt is already recorded, so a controller
        killed here finds it next time and settles it by that id."""
        backend = self.backend(cluster)
        sid = submission_id(job.job_id, attempt.attempt)
        self._fence_everywhere(job, attempt)

        def submit() -> str:
            write_fence(
                fence_url(cluster, job.job_id), cluster.storage_options, attempt.epoch,
                attempt.attempt,
            )  # fmt: skip
            spec = self._spec(job, cluster, attempt)
            if backend.exists(sid):
                return sid
            return backend.submit(spec)

        def done(future: Future) -> None:
            now = self.clock()
            try:
                ray_job_id = future.result()
            except BackendError as exc:
                if exc.timed_out or "already exists" in str(exc):
                    # The cluster may have it: the next observation settles it by its id.
                    log.warning(
                        "job %s: submit to %s unanswered: %s", job.job_id, cluster.name, exc
                    )
                    return
                self._submit_failed(job, attempt, cluster, str(exc), now)
                return
            except Exception as exc:  # noqa: BLE001 - the run config could not be written
                self._submit_failed(job, attempt, cluster, str(exc), now)
                return
            current = self.state.get_attempt(job.job_id, attempt.attempt)
            if current.ray_job_id is None:
                with self.state.decision() as tx:
                    tx.update_attempt(
                        job.job_id, attempt.attempt, ray_job_id=ray_job_id, submitted_at=now
                    )
                    tx.add_event(
                        job.job_id,
                        "submit",
                        f"submitted {ray_job_id} to {cluster.name}",
                        now,
                        attempt.attempt,
                    )

        self._effect(cluster.name, f"submit-{job.job_id}-{attempt.attempt}", submit, done)

    def _submit_failed(self, job, attempt, cluster: ClusterView, why: str, now: float) -> None:
        """The cluster refused the attempt outright: back to the queue, with a back-off."""
        current = self.state.get_attempt(job.job_id, attempt.attempt)
        if current.state not in (AttemptState.SUBMITTED,) or current.ray_job_id is not None:
            return
        with self.state.decision() as tx:
            _failed_before_start(tx, job.job_id, attempt.attempt, why, now)
            self._back_off(tx, self._job(job.job_id), now)
            cause = f"submit to {cluster.name} failed: {why}"
            self._settle(tx, job.job_id, JobState.PENDING, cause, now, attempt.attempt)
