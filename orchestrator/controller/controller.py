"""The reconcile loop: observe the fleet, decide, apply; nothing twice, nothing half.

Each tick:
1. observe: every cluster is probed and asked about its attempts on its own lane
   (controller/lanes.py), side by side and bounded; a cluster that hangs keeps its last word
   and holds no one else up. What the lanes finished since the last tick is applied first.
2. decide: pure functions of what was observed (controller/watch.py for live attempts,
   scheduling/ for placement, preemption, leases, budgets and loss detection).
3. apply: each decision in one transaction (controller/writes.py), and the calls it needs
   (submit, stop, drain request, fence) queued on the cluster's lane.

All durable facts live in ControllerState, so a controller killed at any line reloads them and
carries on: an attempt recorded but perhaps never submitted is looked up by its deterministic
submission id and submitted only if its cluster has never heard of it; a checkpoint copy that
was under way starts again (a copy commits on its target once, verified).

Fencing: an attempt's epoch is its number. Placing attempt N writes the fence N into the job's
folder on every cluster the job visited, so a partitioned attempt that comes back stops at its
next commit; a LOST attempt holds its devices until its cluster confirms it stopped; and only
checkpoints committed by the job's current attempt enter the catalog, with their manifest's
digest, so the next attempt continues the newest line and a copy is used only if its manifest
is the one recorded.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from pathlib import Path

from omegaconf import DictConfig

from orchestrator.backends.base import ClusterBackend
from orchestrator.backends.ray_jobs import RayJobsBackend
from orchestrator.controller import watch as w
from orchestrator.controller.finishing import FinishingMixin
from orchestrator.controller.job_states import AttemptState, JobState
from orchestrator.controller.lanes import Lanes, storage_lane
from orchestrator.controller.observe import ClusterSeen, Watched, observe_cluster, timed_out
from orchestrator.controller.paths import attempt_dir, checkpoints_url
from orchestrator.controller.placing import PlacingMixin
from orchestrator.controller.state import AttemptRecord, ControllerState, JobRecord
from orchestrator.fleet import fleet as fleet_mod
from orchestrator.fleet.environment import controller_cluster
from orchestrator.fleet.fleet import ClusterView
from orchestrator.fleet.probe import ClusterHealth, probe
from orchestrator.scheduling import loss

log = logging.getLogger("spillway.controller")

__all__ = ["Controller", "attempt_dir", "checkpoints_url"]

# How long a tick waits for this tick's observations before deciding with what it has.
OBSERVE_WAIT_S = 3.0
# A lane busy with an observation longer than this counts as a cluster that does not answer.
OBSERVE_STALE_S = 5.0


class Controller(PlacingMixin, FinishingMixin):
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
        observe_wait_s: float = OBSERVE_WAIT_S,
    ) -> None:
        self.state_dir = state_dir
        self.fleet_cfg = fleet_cfg
        self.state = ControllerState.open(Path(state_dir) / "controller.db")
        self._backend_for = backend_for
        self._probe_cluster = probe
        self.clock = clock
        self._fleet = fleet or (lambda: fleet_mod.resolve(fleet_cfg, state_dir))
        self._observe_wait_s = observe_wait_s
        # Requests from the API and the loop never interleave inside one decision.
        self.lock = threading.RLock()
        self.lanes = Lanes()
        self._copies: dict[tuple[str, int], threading.Thread] = {}
        # Set by the service to run the loop at once: a copy that finishes between ticks is
        # submitted then, not up to a tick later (about 1 s of each move, measured).
        self.wake: Callable[[], None] = lambda: None
        self._backends: dict[str, tuple[tuple, ClusterBackend]] = {}
        # Per cluster: its latest finished observation, the one under way and since when,
        # and loss detection's history.
        self._seen: dict[str, ClusterSeen] = {}
        self._observing: dict[str, tuple[float, Future]] = {}
        self._loss: dict[str, loss.ProbeHistory] = {}
        self._verdict_said: dict[str, str] = {}  # the last verdict logged per cluster
        # Calls queued on lanes whose outcome the loop applies once they finish.
        self._effects: list[tuple[Future, Callable[[Future], None]]] = []
        self._pruned_since_start = False  # see FinishingMixin._retain_after_a_restart
        # (job, cluster, epoch) -> steps retention forgot and deletes: never entered again.
        self._doomed: dict[tuple[str, str, int], set[int]] = {}
        # (job, cluster) -> the attempt whose retention was asked while a listing ran.
        self._retain_again: dict[tuple[str, str], AttemptRecord] = {}

    def clusters(self) -> dict[str, ClusterView]:
        return {v.name: v for v in self._fleet()}

    def close(self) -> None:
        self.lanes.close()
        self.state.close()

    def backend(self, cluster: ClusterView) -> ClusterBackend:
        """One backend per cluster address and token, kept across ticks: making a Jobs API
        client costs an HTTP round trip. A cluster that stops answering gets a fresh one."""
        key = (cluster.dashboard_url, cluster.token)
        cached = self._backends.get(cluster.name)
        if cached is None or cached[0] != key:
            cached = self._backends[cluster.name] = (key, self._backend_for(cluster))
        return cached[1]

    def _order(self, job: JobRecord) -> list[str]:
        """The clusters the job accepts, in its order, else the fleet's."""
        return list(job.clusters) or list(self.fleet_cfg.clusters)

    def _job(self, job_id: str) -> JobRecord:
        job = self.state.get_job(job_id)
        if job is None:
            raise KeyError(f"no job {job_id}")
        return job

    # ---- the loop -----------------------------------------------------------------------

    def reconcile(self, now: float) -> None:
        clusters = self._stage("resolving the fleet", self.clusters)
        if clusters is None:
            return  # the fleet cannot be read this tick: decide nothing without it
        with self.lock:
            self._stage("finished calls", self._apply_effects)
            if not self._pruned_since_start:
                self._pruned_since_start = True
                self._stage("retention after a restart", self._retain_after_a_restart, clusters)
            # Deadlines first, on what the clusters last said: a drain before a lease ends or
            # at a budget must not wait for this tick's observations.
            self._stage("lease watch", self._watch_leases, clusters, now)
            self._stage("budgets", self._watch_budgets, clusters, now)
        self._observe(clusters, now)
        # Read again after observing (which may wait seconds): a lease cut short meanwhile
        # must count in this tick's decisions, not the next one's.
        clusters = self._stage("resolving the fleet", self.clusters) or clusters
        now = max(now, self.clock())
        with self.lock:
            self._stage("finished calls", self._apply_effects)
            verdicts = self._stage("loss detection", self._verdicts, clusters, now) or {}
            for attempt in self.state.active_attempts():
                where = f"job {attempt.job_id} attempt {attempt.attempt}"
                self._stage(where, self._watch, attempt, clusters, verdicts, now)
            for attempt in self.state.unreleased_attempts():
                where = f"releasing job {attempt.job_id} attempt {attempt.attempt}"
                self._stage(where, self._release, attempt, clusters, verdicts)
            for attempt in self.state.preparing_attempts():
                where = f"copy for job {attempt.job_id} attempt {attempt.attempt}"
                self._stage(where, self._advance_copy, attempt, clusters, now)
            self._stage("return home", self._return_home, clusters, verdicts, now)
            self._stage("placement", self._place_pending, clusters, verdicts, now)
            retention = self.fleet_cfg.get("events_retention_s", 30 * 86400.0)
            self._stage("event retention", self.state.prune_events, now - retention)

    def _stage(self, what: str, fn: Callable, *args):
        """Run one stage of the tick; its failure is logged with its traceback and the rest of
        the tick goes on: one cluster, one job, one stage fails alone."""
        try:
            return fn(*args)
        except Exception:
            log.exception("%s failed this tick", what)
            return None

    # ---- observe ------------------------------------------------------------------------

    def _watched(self) -> dict[str, list[Watched]]:
        by_cluster: dict[str, list[Watched]] = {}
        attempts = [(a, True) for a in self.state.active_attempts()]
        attempts += [(a, False) for a in self.state.unreleased_attempts()]
        for a, active in attempts:
            saved = self._seen_attempt(a)
            last = (saved.last_save or {}).get("step") if saved else None
            by_cluster.setdefault(a.cluster, []).append(
                Watched(
                    a.job_id,
                    a.attempt,
                    a.ray_job_id,
                    a.first_step_at is None,
                    last,
                    # Not once it handed over (or ended unheard): only its end is looked for.
                    draining=active and a.interrupted_at is not None,
                )
            )
        return by_cluster

    def hurried(self) -> bool:
        """Whether an attempt was asked to drain and still runs, or has handed over and is only
        exiting: its acknowledgement starts the job's next attempt and its end frees its
        devices, so the loop should look again within a fraction of a second rather than at
        its next tick (a drain's save takes about half a second)."""
        now = self.clock()
        return any(
            a.interrupted_at is not None and a.state == AttemptState.RUNNING
            for a in self.state.active_attempts()
        ) or any(self._exiting(a, now) for a in self.state.unreleased_attempts())

    def _exiting(self, attempt: AttemptRecord, now: float) -> bool:
        """DRAINED at its acknowledgement and not yet ended, within the drain_timeout_s it is
        given to end by itself (then it is stopped)."""
        return (
            attempt.state == AttemptState.DRAINED
            and now - (attempt.ended_at or now)
            < _placement(self._job(attempt.job_id))["drain_timeout_s"]
        )

    def _observe(self, clusters: dict[str, ClusterView], now: float) -> None:
        self._collect(now)  # what lanes finished since the last tick
        watched = self._watched()
        started = []
        for name, view in clusters.items():
            if name in self._observing:
                continue  # a hung cluster holds one observation, never a pile of them
            backend, todo = self.backend(view), watched.get(name, [])
            future = self.lanes.run(
                name,
                "observe",
                lambda v=view, b=backend, t=todo: observe_cluster(
                    v, b, self._probe_cluster, t, now
                ),
            )
            if future is not None:
                self._observing[name] = (now, future)
                # A cluster already failing is not waited for: it would hold up every tick.
                history = self._loss.get(name)
                if history is None or history.failing_since is None:
                    started.append(future)
        if started:
            wait_futures(started, timeout=self._observe_wait_s)
        self._collect(now)

    def _collect(self, now: float) -> None:
        for name, (since, future) in list(self._observing.items()):
            if future.done():
                del self._observing[name]
                try:
                    seen = future.result()
                except Exception as exc:  # noqa: BLE001 - logged on its lane
                    health = ClusterHealth(False, error=str(exc), failure="error")
                    seen = ClusterSeen(name, since, health)
                self._seen[name] = seen
                self._record_loss(name, seen.result, seen.at)
            elif now - since >= OBSERVE_STALE_S:
                self._seen[name] = timed_out(name, since, now)
                self._record_loss(name, "timeout", now)

    def _home_reachable(self) -> bool:
        """Whether the controller reaches its own cluster: if not, the partition is ours and
        no other cluster's silence counts against it."""
        home = controller_cluster(self.fleet_cfg)
        seen = self._seen.get(home) if home else None
        return seen is None or seen.health.reachable

    def _record_loss(self, cluster: str, result: str, at: float) -> None:
        home = controller_cluster(self.fleet_cfg)
        counted = self._home_reachable() or cluster == home
        history = self._loss.get(cluster, loss.ProbeHistory())
        self._loss[cluster] = loss.observe(history, result, at, home_reachable=counted)

    def _verdicts(self, clusters: dict[str, ClusterView], now: float) -> dict[str, str]:
        """Loss detection per cluster: up, suspect or lost. No remote cluster is declared lost
        while the controller cannot reach its own home cluster: the partition may be ours."""
        home = controller_cluster(self.fleet_cfg)
        home_reachable = self._home_reachable()
        out = {}
        for name in clusters:
            history = self._loss.get(name)
            if history is None:
                out[name] = "suspect"  # no word yet this run: decide nothing about it
                continue
            out[name] = loss.verdict(
                history,
                now,
                lost_after_s=self.fleet_cfg.lost_after_s,
                refused_lost_after_s=self.fleet_cfg.get("refused_lost_after_s", 5.0),
                home_reachable=home_reachable or name == home,
            )
            if self._verdict_said.get(name, "up") != out[name]:
                seen = self._health(name)
                log.info(
                    "cluster %s %s: %s (%s)", name, out[name], loss.describe(history, now),
                    (seen.error if seen else None) or "answered",
                )  # fmt: skip
            self._verdict_said[name] = out[name]
        return out

    def _seen_attempt(self, attempt: AttemptRecord):
        seen = self._seen.get(attempt.cluster)
        return seen.attempts.get((attempt.job_id, attempt.attempt)) if seen else None

    def _health(self, name: str) -> ClusterHealth | None:
        seen = self._seen.get(name)
        return seen.health if seen else None

    # ---- effects on the lanes -----------------------------------------------------------

    def _effect(self, cluster: str, key: str, fn: Callable[[], object], done=None) -> bool:
        """Queue a call on the cluster's lane; `done(future)` runs on the loop once it ends.
        False when the same call is still under way there."""
        future = self.lanes.run(cluster, key, fn)
        if future is None:
            return False
        self._effects.append((future, done or (lambda f: None)))
        return True

    def _apply_effects(self) -> None:
        finished = [(f, d) for f, d in self._effects if f.done()]
        self._effects = [(f, d) for f, d in self._effects if not f.done()]
        for future, done in finished:
            self._stage("applying a finished call", done, future)

    # ---- watching live attempts ---------------------------------------------------------

    def _limits(self, job: JobRecord) -> w.Limits:
        return w.Limits(
            drain_timeout_s=_placement(job)["drain_timeout_s"],
            submit_deadline_s=self.fleet_cfg.get("submit_deadline_s", 300.0),
        )

    def _watch(
        self,
        attempt: AttemptRecord,
        clusters: dict[str, ClusterView],
        verdicts: dict[str, str],
        now: float,
    ) -> None:
        job = self._job(attempt.job_id)
        cluster = clusters.get(attempt.cluster)
        if cluster is None:  # removed from the fleet: nothing more will be heard of it
            what = f"{attempt.cluster} is no longer in the fleet"
            self._lose(job, attempt, attempt.cluster, what, now, cluster_lost=True)
            return
        lease_over = (
            cluster.kind == "leased" and cluster.lease_end is not None and now >= cluster.lease_end
        )
        sid_busy = self.lanes.busy(cluster.name, _submit_key(attempt))
        decision = w.watch(
            job.state,
            attempt,
            self._seen_attempt(attempt),
            cluster.name,
            verdicts.get(cluster.name, "suspect"),
            lease_over,
            sid_busy,
            now,
            self._limits(job),
        )
        if isinstance(decision, w.Lose) and verdicts.get(cluster.name) == "lost":
            why = loss.describe(self._loss[cluster.name], now)
            decision = w.Lose(f"{cluster.name} unreachable: {why}", True, decision.stop)
        self._apply_watch(decision, job, attempt, cluster, now)

    def _apply_watch(self, decision, job, attempt, cluster: ClusterView, now: float) -> None:
        if isinstance(decision, w.StopCancelled):
            self._stop_cancelled(job, attempt, cluster, now)
        elif isinstance(decision, w.Lose):
            if decision.stop and attempt.ray_job_id:
                self._stop(cluster, attempt.ray_job_id)
            self._lose(job, attempt, cluster.name, decision.what, now, decision.cluster_lost)
        elif isinstance(decision, w.Resubmit):
            with self.state.decision() as tx:
                tx.add_event(
                    job.job_id,
                    "submit",
                    f"{cluster.name} never got attempt {attempt.attempt}: submitting it again",
                    now,
                    attempt.attempt,
                )
            self._hand_over(job, cluster, attempt)
        elif isinstance(decision, w.Confirm):
            with self.state.decision() as tx:
                tx.update_attempt(
                    job.job_id,
                    attempt.attempt,
                    ray_job_id=decision.ray_job_id,
                    submitted_at=attempt.submitted_at or now,
                )
                tx.add_event(
                    job.job_id,
                    "submit",
                    f"{cluster.name} has {decision.ray_job_id}",
                    now,
                    attempt.attempt,
                )
        elif isinstance(decision, w.Started):
            with self.state.decision() as tx:
                tx.update_attempt(
                    job.job_id, attempt.attempt, state=AttemptState.RUNNING, started_at=now
                )
                tx.set_backoff(job.job_id, 0, 0.0)
                self._settle(
                    tx,
                    job.job_id,
                    JobState.RUNNING,
                    f"running on {cluster.name}",
                    now,
                    attempt.attempt,
                )
        elif isinstance(decision, w.RequestDrain):
            self._request_drain(job, attempt, cluster, now)
        elif isinstance(decision, w.Finished):
            self._finish(job, attempt, cluster, decision.info, now)
        elif isinstance(decision, w.Acknowledged):
            self._acknowledged(job, attempt, cluster, decision.step, now)
        self._record_progress(job, attempt, cluster, now)

    def _record_progress(self, job, attempt, cluster: ClusterView, now: float) -> None:
        """What the attempt's run files said this tick: its first step, and new commits."""
        seen = self._seen_attempt(attempt)
        if seen is None:
            return
        current = self.state.get_attempt(job.job_id, attempt.attempt)
        if current.state not in (AttemptState.SUBMITTED, AttemptState.RUNNING):
            return
        with self.state.decision() as tx:
            if current.first_step_at is None and seen.first is not None:
                fields = self._step_fields(job.job_id, current, seen.first, seen.last)
                tx.update_attempt(job.job_id, attempt.attempt, **fields)
            if seen.commits:
                self._record_commits(tx, job.job_id, current, cluster, seen, now)

    def _request_drain(self, job, attempt, cluster: ClusterView, now: float) -> None:
        files = self._run_files(cluster, job.job_id, attempt.attempt)
        reason = job.reason or ""

        def done(future: Future) -> None:
            future.result()  # a failed write is logged and asked again next tick
            self.state.update_attempt(job.job_id, attempt.attempt, interrupted_at=now)

        self._effect(
            storage_lane(cluster.name),
            f"drain-{job.job_id}-{attempt.attempt}",
            lambda: files.request_drain(reason),
            done,
        )

    def _stop(self, cluster: ClusterView, ray_job_id: str) -> None:
        backend = self.backend(cluster)
        self._effect(cluster.name, f"stop-{ray_job_id}", lambda: backend.stop(ray_job_id))

    def _stop_cancelled(self, job, attempt, cluster: ClusterView, now: float) -> None:
        """The user's cancel is recorded; make the cluster match it. The attempt is released
        once its cluster confirms it stopped (it may be unreachable just now)."""
        seen = self._seen_attempt(attempt)
        if attempt.ray_job_id or (seen and seen.known):
            self._stop(cluster, attempt.ray_job_id or _sid(attempt))
        fields = self._ended(job, attempt, cluster, now, seen)
        with self.state.decision() as tx:
            tx.add_cost(job.job_id, fields["cost"])
            tx.update_attempt(
                job.job_id,
                attempt.attempt,
                state=AttemptState.STOPPED,
                exit_reason="cancelled by the user",
                **fields,
            )

    def _release(
        self, attempt: AttemptRecord, clusters: dict[str, ClusterView], verdicts: dict[str, str]
    ) -> None:
        """An attempt that ended unheard, or that exits after its acknowledged drain, holds its
        devices until its cluster says it stopped; while it still runs there (a partition
        healed, an exit that hangs) it is stopped."""
        cluster = clusters.get(attempt.cluster)
        now = self.clock()
        if cluster is None:
            self.state.update_attempt(attempt.job_id, attempt.attempt, released_at=now)
            return
        exiting = self._exiting(attempt, now)
        verdict = w.release(
            self._seen_attempt(attempt), verdicts.get(cluster.name, "suspect"), exiting
        )
        if verdict == "released":
            with self.state.decision() as tx:
                tx.update_attempt(attempt.job_id, attempt.attempt, released_at=now)
                tx.add_event(
                    attempt.job_id,
                    "release",
                    f"{cluster.name} confirms attempt {attempt.attempt} no longer runs",
                    now,
                    attempt.attempt,
                )
        elif verdict == "stop":
            self._stop(cluster, attempt.ray_job_id or _sid(attempt))


def _placement(job: JobRecord) -> dict:
    return json.loads(job.run_config)["placement"]


def _submit_key(attempt: AttemptRecord) -> str:
    return f"submit-{attempt.job_id}-{attempt.attempt}"


def _sid(attempt: AttemptRecord) -> str:
    from orchestrator.backends.base import submission_id

    return submission_id(attempt.job_id, attempt.attempt)
