"""What one cluster says this tick: its health, each attempt's status, and the run files.

Runs on the cluster's lane (controller/lanes.py), never on the loop: every call in it is
bounded (the probe's and the backend's timeouts, fsspec's), and a cluster that hangs leaves
its last observation standing while the others are read afresh. Nothing here decides or
writes the controller's state; it only reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from orchestrator.backends.base import (
    TERMINAL,
    BackendError,
    ClusterBackend,
    JobInfo,
    submission_id,
)
from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.manifest import (
    digest_of,
    manifest_epoch,
    parse_manifest,
    read_manifest_bytes,
)
from orchestrator.checkpoint.storage import open_root
from orchestrator.controller.migration import committed_sizes
from orchestrator.controller.paths import checkpoints_url, run_files
from orchestrator.controller.records import Commit
from orchestrator.fleet.fleet import ClusterView
from orchestrator.fleet.probe import ClusterHealth

log = logging.getLogger("spillway.controller")


@dataclass(frozen=True)
class Watched:
    """One attempt the loop wants news of, as the loop knew it when it asked."""

    job_id: str
    attempt: int
    ray_job_id: str | None  # None: never confirmed, look it up by its deterministic id
    read_steps: bool = False  # also read its first and last step from its metrics
    last_save_step: int | None = None  # the newest save already seen (commits after it are new)
    draining: bool = False  # asked to drain: its acknowledgement is read while it runs


@dataclass(frozen=True)
class AttemptSeen:
    info: JobInfo | None = None  # None when the cluster does not know the submission
    known: bool | None = None  # whether the cluster has the submission id (None: not asked)
    last_save: dict | None = None  # {"step", "seconds", ...} of its newest commit
    first: dict | None = None  # its first metrics record, when asked
    last: dict | None = None  # its newest metrics record
    ack: dict | None = None  # its drain acknowledgement, once it ended or while it drains
    # The job's committed checkpoints in this cluster's store, read when a new save shows up:
    # step -> Commit (manifest digest and epoch as found now).
    commits: dict[int, Commit] | None = None
    listed: bool = False  # commits is the store's whole listing (else: only the newest save)
    error: str | None = None  # a call for this attempt failed (the cluster answered others)


@dataclass(frozen=True)
class ClusterSeen:
    name: str
    at: float  # when the observation began
    health: ClusterHealth
    attempts: dict[tuple[str, int], AttemptSeen] = field(default_factory=dict)

    @property
    def result(self) -> str:
        """ok, refused, timeout or error: what loss detection counts."""
        return "ok" if self.health.reachable else (self.health.failure or "error")


def observe_cluster(
    cluster: ClusterView,
    backend: ClusterBackend,
    probe: Callable[[ClusterView], ClusterHealth],
    watched: list[Watched],
    now: float,
) -> ClusterSeen:
    health = probe(cluster)
    if not health.reachable:
        return ClusterSeen(cluster.name, now, health)
    seen: dict[tuple[str, int], AttemptSeen] = {}
    for w in watched:
        seen[(w.job_id, w.attempt)] = _observe_attempt(cluster, backend, w)
    return ClusterSeen(cluster.name, now, health, seen)


def _observe_attempt(cluster: ClusterView, backend: ClusterBackend, w: Watched) -> AttemptSeen:
    sid = w.ray_job_id or submission_id(w.job_id, w.attempt)
    try:
        if w.ray_job_id is None and not backend.exists(sid):
            return AttemptSeen(known=False)
        info = backend.info(sid)
    except BackendError as exc:
        if "does not exist" in str(exc) or "not found" in str(exc).lower():
            return AttemptSeen(known=False)
        return AttemptSeen(error=str(exc))
    files = run_files(cluster, w.job_id, w.attempt)
    news: dict = {}
    try:
        ended = info.status in TERMINAL
        if ended or w.draining:
            # Read first: the attempt commits, then acknowledges, so what is read after an
            # acknowledgement includes the step it names.
            news["ack"] = files.drain_ack()
        news["last_save"] = files.last_save()
        news["last"] = files.last_metrics()
        if w.read_steps:
            news["first"] = files.first_metrics()
        saved = (news["last_save"] or {}).get("step")
        acked = (news.get("ack") or {}).get("step")
        if ended or acked is not None:
            # The whole listing once it ended or acknowledged its drain (it commits nothing
            # more): what it left, and what is gone from the store. Saves a tick apart are
            # seen one manifest at a time, the newest, so only this finds every one.
            news["commits"], news["listed"] = committed(cluster, w.job_id), True
        elif saved is not None and saved != w.last_save_step:
            # While it runs, one manifest per new save: a tick costs one read, not a listing.
            news["commits"] = {saved: commit_of(cluster, w.job_id, saved)}
    except Exception as exc:  # noqa: BLE001 - a store hiccup: this tick has no run-file news
        log.warning(
            "job %s attempt %d: run files on %s: %s", w.job_id, w.attempt, cluster.name, exc
        )
    return AttemptSeen(info=info, known=True, **news)


def commit_of(cluster: ClusterView, job_id: str, step: int) -> Commit:
    """One committed checkpoint as its manifest says now: digest, epoch, bytes."""
    fs, root = open_root(checkpoints_url(cluster, job_id), cluster.storage_options)
    step_dir = catalog.step_dir(root, step)
    raw = read_manifest_bytes(fs, step_dir)
    doc = parse_manifest(step_dir, raw)
    size = sum(f["size"] for f in doc["files"])
    return Commit(bytes=size, digest=digest_of(raw), epoch=manifest_epoch(doc))


def committed(cluster: ClusterView, job_id: str) -> dict[int, Commit]:
    """The job's committed checkpoints on the cluster's store, with each manifest's digest."""
    fs, root = open_root(checkpoints_url(cluster, job_id), cluster.storage_options)
    sizes = committed_sizes(cluster, job_id)
    return {
        step: Commit(bytes=sizes.get(step, 0), digest=digest, epoch=epoch)
        for step, (digest, epoch) in catalog.committed_manifests(fs, root).items()
    }


def timed_out(cluster: str, since: float, now: float) -> ClusterSeen:
    """What a lane still busy with an observation started at `since` amounts to."""
    health = ClusterHealth(
        False,
        error=f"no answer for {now - since:.0f}s (observation still running)",
        failure="timeout",
    )
    return ClusterSeen(cluster, since, health)
