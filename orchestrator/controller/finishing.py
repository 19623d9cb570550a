"""How the controller ends an attempt: heard to end (its exit read by the taxonomy) or lost,
and where the job goes next. Each ending is one transaction: the attempt's last fields, its
cost, its commits, the job's move and its restart count commit together or not at all."""

from __future__ import annotations

import json
import logging

from orchestrator import exit_codes
from orchestrator.backends.base import STOPPED, JobInfo
from orchestrator.controller.job_states import ACTIVE_ATTEMPT, TERMINAL, AttemptState, JobState
from orchestrator.controller.lanes import cleanup_lane
from orchestrator.controller.observe import AttemptSeen
from orchestrator.controller.paths import checkpoints_url, run_files
from orchestrator.controller.recovery import Outcome, classify, cluster_at_fault, recover
from orchestrator.controller.requests import ACTIVE
from orchestrator.controller.retention import delete_steps, doomed_steps
from orchestrator.controller.state import AttemptRecord, InvalidTransition, JobRecord
from orchestrator.controller.writes import Transaction
from orchestrator.fleet.fleet import ClusterView
from orchestrator.rundir import RunDir
from orchestrator.scheduling.backoff import retry_at

log = logging.getLogger("spillway.controller")


def _placement(job: JobRecord) -> dict:
    return json.loads(job.run_config)["placement"]


def unloadable_step(attempt: AttemptRecord, message: str | None) -> int | None:
    """The step an attempt was told to resume from, if it ended before its first step saying
    that checkpoint does not verify (catalog.require_step's words); None otherwise."""
    step = attempt.resumed_from_step
    if step is None or attempt.first_step_at is not None or not message:
        return None
    said = f"checkpoint step {step} in "
    return step if said in message and "does not verify" in message else None


class FinishingMixin:
    """Part of Controller (controller.py): ending attempts and recovering their jobs."""

    def _run_files(self, cluster: ClusterView, job_id: str, attempt: int) -> RunDir:
        return run_files(cluster, job_id, attempt)

    def _settle(
        self, tx: Transaction, job_id: str, to: JobState, cause: str, now: float, attempt: int
    ) -> None:
        """Move a live job to `to`; a job the user cancelled meanwhile keeps its CANCELLED."""
        try:
            tx.transition(job_id, to, cause, now, attempt, expect=ACTIVE)
        except InvalidTransition as exc:
            log.info("%s; kept: %s", exc, cause)

    def _cluster_healthy(self, cluster: ClusterView) -> bool:
        """Checked before a failure is called the user's: the cluster answers and still has
        all its devices (a node gone takes its devices with it). As the observation that read
        the attempt's end found it, probed just before: no call to the cluster on the loop."""
        health = self._health(cluster.name)
        if health is None or not health.reachable:
            return False
        return (health.devices_total or 0) >= cluster.devices

    def _finish(
        self, job: JobRecord, attempt: AttemptRecord, cluster: ClusterView, info: JobInfo, now
    ) -> None:
        seen = self._seen_attempt(attempt)
        code = info.exit_code
        user_codes = list(_placement(job)["user_error_exit_codes"])
        healthy = code not in user_codes or self._cluster_healthy(cluster)
        outcome = classify(info.status, code, user_codes, cluster_healthy=healthy)
        fields = self._ended(job, attempt, cluster, now, seen)
        fields.update(exit_reason=info.message, released_at=now)
        at = f" after step {fields['last_step']}" if fields.get("last_step") else ""
        where = f"attempt {attempt.attempt} on {cluster.name}"
        with self.state.decision() as tx:
            tx.add_cost(job.job_id, fields["cost"])
            if seen is not None and seen.commits:
                self._record_commits(tx, job.job_id, attempt, cluster, seen, now)
            if outcome == Outcome.SUCCEEDED:
                tx.update_attempt(
                    job.job_id, attempt.attempt, state=AttemptState.SUCCEEDED, **fields
                )
                self._settle(
                    tx,
                    job.job_id,
                    JobState.SUCCEEDED,
                    f"finished on {cluster.name}",
                    now,
                    attempt.attempt,
                )
            elif outcome == Outcome.DRAINED:
                self._drained(tx, job, attempt, cluster, fields, seen, now)
            elif outcome == Outcome.NO_CAPACITY:
                tx.update_attempt(job.job_id, attempt.attempt, state=AttemptState.FAILED, **fields)
                self._back_off(tx, job, now)
                cause = f"{cluster.name} could not reserve {attempt.world_size} device(s); back to the queue"
                self._settle(tx, job.job_id, JobState.PENDING, cause, now, attempt.attempt)
            elif outcome == Outcome.USER_ERROR:
                tx.update_attempt(job.job_id, attempt.attempt, state=AttemptState.FAILED, **fields)
                cause = (
                    f"{where} failed with exit code {code}, a user error "
                    f"(placement.user_error_exit_codes): {info.message}"
                )
                self._settle(tx, job.job_id, JobState.FAILED, cause, now, attempt.attempt)
            elif outcome == Outcome.FENCED:
                # A newer attempt exists; this one stopped committing nothing. Its job has
                # moved on already: nothing to recover.
                fields.setdefault("interrupted_at", attempt.interrupted_at or now)
                tx.update_attempt(job.job_id, attempt.attempt, state=AttemptState.LOST, **fields)
            else:
                fields.setdefault("interrupted_at", attempt.interrupted_at or now)
                ended = AttemptState.STOPPED if info.status == STOPPED else AttemptState.FAILED
                tx.update_attempt(job.job_id, attempt.attempt, state=ended, **fields)
                meaning = exit_codes.RESERVED.get(code)
                what = (
                    f"{where} {info.status.lower()}{at} "
                    f"(exit code {code}{', ' + meaning if meaning else ''})"
                )
                bad = unloadable_step(attempt, info.message)
                if bad is not None:
                    # Its pinned step did not verify there: the next attempt must not be told
                    # it again, or every restart fails the same way while an older one is good.
                    tx.forget_checkpoints(job.job_id, cluster.name, [bad])
                    what += (
                        f"; checkpoint step {bad} on {cluster.name} does not verify, passed over"
                    )
                # A cluster whose environment cannot run Spillway is left as if lost.
                self._recover(tx, job, attempt, cluster.name, what, now, cluster_at_fault(outcome))

    def _lose(
        self, job, attempt, cluster_name: str, what: str, now: float, cluster_lost: bool
    ) -> None:
        """End an attempt we could not hear end (cluster gone, lease over, drain ignored). It
        stays unreleased, holding its devices, until its cluster confirms it stopped."""
        cluster = self.clusters().get(cluster_name)
        seen = self._seen_attempt(attempt)
        fields = self._ended(job, attempt, cluster, now, seen) if cluster else {"ended_at": now}
        with self.state.decision() as tx:
            tx.add_cost(job.job_id, fields.get("cost", 0.0))
            tx.update_attempt(
                job.job_id,
                attempt.attempt,
                state=AttemptState.LOST,
                exit_reason=what,
                interrupted_at=attempt.interrupted_at or now,
                **fields,
            )
            self._recover(tx, job, attempt, cluster_name, what, now, cluster_lost)
        if cluster is not None:
            # Fenced at once, not when the next attempt is placed: from its next commit on, an
            # attempt still training there commits and prunes nothing.
            self._fence(cluster, job.job_id, attempt.epoch + 1, attempt.attempt + 1)

    def _recover(
        self, tx: Transaction, job, attempt, cluster_name: str, what, now, cluster_lost: bool
    ) -> None:
        placement = _placement(job)
        restarts = tx.count_restart(job.job_id)
        plan = recover(
            placement["recovery"],
            cluster_name,
            self._order(job),
            cluster_lost,
            restarts,
            placement["max_restarts"],
            what,
        )
        if plan.give_up:
            self._settle(tx, job.job_id, JobState.FAILED, plan.cause, now, attempt.attempt)
            return
        tx.set_next_clusters(job.job_id, plan.next_clusters)
        self._settle(tx, job.job_id, JobState.PENDING, plan.cause, now, attempt.attempt)

    def _acknowledged(
        self, job: JobRecord, attempt: AttemptRecord, cluster: ClusterView, step: int, now
    ) -> None:
        """An attempt that acknowledged its drain after `step`, that step's commit read, hands
        the job on while its process exits: DRAINED now, its devices booked until its cluster
        says it ended (Controller._release), as for an attempt that ended unheard."""
        seen = self._seen_attempt(attempt)
        fields = self._ended(job, attempt, cluster, now, seen)
        # Its metrics reach the store every logger.metrics_flush_s; the acknowledgement is sure.
        fields["last_step"] = max(fields.get("last_step") or 0, step)
        fields["exit_reason"] = f"acknowledged its drain after step {step}, then exited"
        with self.state.decision() as tx:
            tx.add_cost(job.job_id, fields["cost"])
            self._record_commits(tx, job.job_id, attempt, cluster, seen, now)
            self._drained(tx, job, attempt, cluster, fields, seen, now)

    def _drained(
        self, tx: Transaction, job: JobRecord, attempt: AttemptRecord, cluster: ClusterView,
        fields: dict, seen: AttemptSeen | None, now: float,
    ) -> None:  # fmt: skip
        """The attempt DRAINED, the job back to the queue with its checkpoint."""
        at = f" after step {fields['last_step']}" if fields.get("last_step") else ""
        why = ""
        if job.state != JobState.DRAINING:
            # Not our request: a SIGTERM from outside, the partner taking its nodes back. Move
            # on, to this cluster only if nothing else has room.
            ack = (seen.ack if seen else None) or {}
            why = f" ({ack.get('reason', 'SIGTERM')})"
            fields["interrupted_at"] = attempt.interrupted_at or ack.get("at", now)
            order = self._order(job)
            tx.set_next_clusters(
                job.job_id, [c for c in order if c != cluster.name] + [cluster.name]
            )
        tx.update_attempt(job.job_id, attempt.attempt, state=AttemptState.DRAINED, **fields)
        cause = f"drained on {cluster.name}{at}{why}; back to the queue with its checkpoint"
        self._settle(tx, job.job_id, JobState.PENDING, cause, now, attempt.attempt)

    def _back_off(self, tx: Transaction, job: JobRecord, now: float) -> None:
        """One more attempt that could not start: the next placement waits longer."""
        failures = job.failures + 1
        # Seeded by the job: jobs that failed together do not all come back on one tick.
        tx.set_backoff(job.job_id, failures, retry_at(now, failures, seed=job.job_id))

    def _ended(self, job, attempt, cluster: ClusterView, now: float, seen) -> dict:
        """Steps reached and cost of an attempt that has just ended."""
        hours = (now - (attempt.started_at or attempt.submitted_at or attempt.created_at)) / 3600
        cost = hours * attempt.world_size * cluster.cost_per_device_hour
        fields = dict(ended_at=now, cost=cost)
        if seen is not None:
            fields.update(self._step_fields(job.job_id, attempt, seen.first, seen.last))
        return fields

    def _step_fields(self, job_id: str, attempt: AttemptRecord, first, last) -> dict:
        """First and last step of an attempt from its metrics, and the steps it redid."""
        fields: dict = {}
        if last is not None:
            fields["last_step"] = last["step"]
        if first is not None and attempt.first_step is None:
            fields["first_step"] = first["step"]
            if "time" in first:
                fields["first_step_at"] = first["time"]
            before = [
                a.last_step
                for a in self.state.attempts(job_id)
                if a.attempt < attempt.attempt and a.last_step is not None
            ]
            if before:
                fields["steps_redone"] = max(0, max(before) - first["step"] + 1)
        return fields

    def _record_commits(
        self, tx: Transaction, job_id: str, attempt: AttemptRecord, cluster: ClusterView,
        seen: AttemptSeen, now: float,
    ) -> None:  # fmt: skip
        """Enter the attempt's own commits in the catalog, with their manifest digests; a
        commit stamped with another epoch (a zombie's leftovers) is never entered. A whole
        listing also drops what the store no longer has; then the attempt's folder is pruned."""
        latest = self.state.latest_attempt(job_id)
        if latest is None or latest.attempt != attempt.attempt:
            return  # a newer attempt exists: this one's commits are not the job's line
        # A listing read before a prune's delete still names the steps that prune doomed;
        # entering them again would leave catalog rows for dirs that are about to go.
        doomed = self._doomed.get((job_id, cluster.name, attempt.epoch), set())
        own = {
            s: c
            for s, c in seen.commits.items()
            if c.epoch in (attempt.epoch, None) and s not in doomed
        }
        url = checkpoints_url(cluster, job_id)
        tx.sync_checkpoints(job_id, cluster.name, url, own, now)
        if seen.listed:
            tx.drop_checkpoints(job_id, cluster.name, list(seen.commits))
        if own:
            self._retain(job_id, attempt, cluster)

    def _retain(self, job_id: str, attempt: AttemptRecord, cluster: ClusterView) -> None:
        """Prune the job's folder on `cluster` to the attempt's newest checkpoints, on the
        cluster's cleanup lane (one listing at a time per job there): which steps go is read
        there, the catalog forgets them here, then they are deleted there. Asked again while
        a listing is under way, it runs once more after it: that listing may predate the
        commit that asked, and the last commit of a line has no later one to prune for it."""
        keep = json.loads(self._job(job_id).run_config)["checkpoint"]["keep"]
        lane, key = cleanup_lane(cluster.name), f"prune-{job_id}"

        def doomed(future) -> None:
            again = self._retain_again.pop((job_id, cluster.name), None)
            # A failed listing is logged on its lane; the next request prunes again.
            steps = future.result() if future.exception() is None else []
            if steps:
                with self.state.decision() as tx:
                    tx.forget_checkpoints(job_id, cluster.name, steps)
                self._doomed.setdefault((job_id, cluster.name, attempt.epoch), set()).update(steps)
                delete = f"delete-{job_id}-{steps[0]}"
                self._effect(lane, delete, lambda: delete_steps(cluster, job_id, steps))
            if again is not None:  # queued behind the delete on the same lane
                self._retain(job_id, again, cluster)

        listing = lambda: doomed_steps(cluster, job_id, attempt.epoch, keep)  # noqa: E731
        if not self._effect(lane, key, listing, doomed):
            self._retain_again[(job_id, cluster.name)] = attempt

    def _retain_after_a_restart(self, clusters: dict[str, ClusterView]) -> None:
        """On a controller's first tick, prune again wherever an unfinished job has
        checkpoints: a controller killed between forgetting doomed steps and deleting them
        left their dirs behind. Each cluster keeps the line of the job's latest attempt there;
        one where that attempt is still active is left to it, since the first observation of
        its newest save prunes there anyway."""
        for job in self.state.list_jobs(set(JobState) - TERMINAL):
            latest = {a.cluster: a for a in self.state.attempts(job.job_id)}  # by attempt
            for name in {c.cluster for c in self.state.checkpoints(job.job_id)}:
                attempt = latest.get(name)
                if name in clusters and attempt and attempt.state not in ACTIVE_ATTEMPT:
                    self._retain(job.job_id, attempt, clusters[name])
