"""Bringing a job's newest committed checkpoint to the cluster its next attempt runs on.

The candidates are every committed checkpoint on every cluster the job has visited, newest
first. The copy verifies every byte against the source's manifest on the way; a checkpoint
that does not verify is passed over for the next newest, so a corrupt shard costs the steps
since the checkpoint before it and nothing more.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.manifest import CheckpointInvalid, verify
from orchestrator.checkpoint.storage import open_root
from orchestrator.checkpoint.transfer import Progress, copy_checkpoint
from orchestrator.controller.paths import checkpoints_url
from orchestrator.controller.records import AttemptRecord
from orchestrator.controller.state import CheckpointRecord, ControllerState
from orchestrator.fleet.fleet import ClusterView

log = logging.getLogger("spillway.controller")

# Seconds between progress writes of a checkpoint copy: enough for a live bar, few writes.
COPY_PROGRESS_EVERY_S = 0.5


@dataclass(frozen=True)
class Source:
    cluster: str
    url: str
    step: int
    epoch: int | None = None
    # How to open url (its cluster's storage options, credentials included).
    options: dict = field(default_factory=dict, repr=False, compare=False)
    # The digest of its manifest (manifest.digest_of) recorded at commit: a copy is used only if the
    # manifest still has it (None: recorded before digests were, on an owned cluster).
    manifest_digest: str | None = None


@dataclass(frozen=True)
class Brought:
    source: Source | None  # None: no committed checkpoint anywhere, the job starts from step 0
    bytes: int  # 0 when the target already had it
    seconds: float


def line_sources(
    records: Iterable[CheckpointRecord], target: str, clusters: dict[str, ClusterView]
) -> list[Source]:
    """The job's checkpoint line, newest first: the newest epoch's commits before any older
    epoch's (a higher step of an older line is a zombie's, never continued), newest step
    first within an epoch, and on a tie the target's own copy first (nothing to copy). Only
    checkpoints the catalog recorded count; one from a leased cluster needs its digest."""
    usable = []
    for r in records:
        view = clusters.get(r.cluster)
        if view is None or (r.manifest_digest is None and view.kind == "leased"):
            continue
        epoch = r.epoch if r.epoch is not None else -1
        source = Source(r.cluster, r.url, r.step, r.epoch, view.storage_options, r.manifest_digest)
        usable.append(((-epoch, -r.step, 0 if r.cluster == target else 1), source))
    return [s for _, s in sorted(usable, key=lambda t: t[0])]


def bring(
    sources: list[Source],
    target: ClusterView,
    job_id: str,
    event: Callable[[str], None],
    progress: Progress | None = None,
    limit_bytes_per_s: float | None = None,
) -> Brought:
    """Copy the newest source that verifies to the target; stop at one the target already has."""
    dst = checkpoints_url(target, job_id)
    for source in sources:
        if source.cluster == target.name:
            return Brought(source, 0, 0.0)
        try:
            copied = copy_checkpoint(
                source.url,
                dst,
                source.step,
                progress=progress,
                limit_bytes_per_s=limit_bytes_per_s,
                src_options=source.options,
                dst_options=target.storage_options,
                expected_manifest_digest=source.manifest_digest,
            )
        except CheckpointInvalid as exc:
            event(
                f"checkpoint step {source.step} on {source.cluster} does not verify ({exc}); "
                "trying the one before it"
            )
            continue
        except FileNotFoundError as exc:  # pruned or removed since it was listed
            event(f"checkpoint step {source.step} on {source.cluster} is gone ({exc})")
            continue
        return Brought(source, copied.bytes, copied.seconds)
    return Brought(None, 0, 0.0)


def copied_here(attempt: AttemptRecord) -> bool:
    """Whether the attempt resumes from the step the controller copied to its cluster for it,
    every byte checked against the manifest as it landed: its ranks need not hash it again. A
    step that was already there (nothing copied) was checked for sizes only, so it is not."""
    return (
        attempt.copy_s is not None
        and attempt.copy_bytes_done > 0
        and attempt.copy_step is not None
        and attempt.copy_step == attempt.resumed_from_step
    )


def committed_sizes(view: ClusterView, job_id: str) -> dict[int, int]:
    """Step -> bytes of the job's committed checkpoints on a cluster whose files are all there
    with their listed sizes (the hashes are checked when a checkpoint is copied or loaded)."""
    fs, root = open_root(checkpoints_url(view, job_id), view.storage_options)
    sizes = {}
    for step in catalog.committed_steps(fs, root):
        try:
            doc = verify(fs, catalog.step_dir(root, step), check_hashes=False)
        except (CheckpointInvalid, FileNotFoundError):
            continue
        sizes[step] = sum(f["size"] for f in doc["files"])
    return sizes


def copy_for_attempt(
    state: ControllerState,
    job_id: str,
    number: int,
    sources: list[Source],
    target: ClusterView,
    limit_bytes_per_s: float | None,
    clock: Callable[[], float] = time.time,
) -> None:
    """Bring the checkpoint for PREPARING attempt `number` and record it: progress while it
    runs, an event for what was copied or passed over, and, last, `copy_s` on the attempt,
    which is what tells the controller the attempt may start. Raises if the copy failed."""
    last_write = 0.0

    def progress(done: int, total: int) -> None:
        nonlocal last_write
        if time.monotonic() - last_write >= COPY_PROGRESS_EVERY_S or done == total:
            last_write = time.monotonic()
            state.update_attempt(job_id, number, copy_bytes_done=done, copy_bytes_total=total)

    def event(cause: str) -> None:
        state.add_event(job_id, "migrate", cause, clock(), number)

    brought = bring(sources, target, job_id, event, progress, limit_bytes_per_s)
    src = brought.source
    if src is None:
        event(f"no checkpoint verifies anywhere; attempt {number} starts from step 0")
    elif src.cluster == target.name:
        event(f"checkpoint step {src.step} is already on {target.name}, verified")
    else:
        url = checkpoints_url(target, job_id)
        # The copy keeps the source's line and digest: its manifest came across byte for byte.
        state.record_checkpoint(
            job_id, src.step, target.name, url, brought.bytes, True, clock(),
            manifest_digest=src.manifest_digest, epoch=src.epoch,
        )  # fmt: skip
        rate = brought.bytes / brought.seconds / 1e6 if brought.seconds > 0 else 0.0
        event(
            f"copied checkpoint step {src.step} from {src.cluster} to {target.name}: "
            f"{brought.bytes} bytes in {brought.seconds:.2f}s ({rate:.1f} MB/s), verified"
        )
    fields = dict(
        copy_step=src.step if src else None,
        resumed_from_step=src.step if src else None,
        copy_s=brought.seconds,
    )
    if src is not None and src.cluster != target.name:
        # Only a copy made now sets the bytes: a repeat after a restart keeps the first's.
        fields.update(copy_bytes_done=brought.bytes, copy_bytes_total=brought.bytes)
    state.update_attempt(job_id, number, **fields)
