"""The set of checkpoints under one storage root, and how one becomes committed.

On a local disk: ``<root>/step-NNNNNNNNN.tmp/`` while being written, renamed to
``<root>/step-NNNNNNNNN/`` once its manifest is in (the rename is atomic there). Object stores
have no atomic directory rename, so there a save writes straight into ``step-NNNNNNNNN/`` and
the manifest, written last, is the commit: a step dir without one is not listed.
There is deliberately no "latest" pointer file: a pointer can be updated before (or without)
the data it points to, so readers scan and verify instead.
"""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Callable

import fsspec
from fsspec.implementations.local import LocalFileSystem

from orchestrator.checkpoint.manifest import (
    MANIFEST_NAME,
    CheckpointInvalid,
    digest_of,
    manifest_epoch,
    parse_manifest,
    read_manifest_bytes,
    verify,
)
from orchestrator.checkpoint.storage import join, remove_tree, rename_dir

logger = logging.getLogger(__name__)

_STEP_RE = re.compile(r"step-(\d{9})")
_TMP_SUFFIX = ".tmp"
_MAX_STEP = 999_999_999


def _step_name(step: int) -> str:
    # A 10-digit name would not sort with the others and parse_step would ignore it,
    # so the checkpoint would silently vanish; fail at save time instead.
    if not 0 <= step <= _MAX_STEP:
        raise ValueError(f"step must be in [0, {_MAX_STEP}], got {step}")
    return f"step-{step:09d}"


def step_dir(root: str, step: int) -> str:
    return join(root, _step_name(step))


def tmp_dir(root: str, step: int) -> str:
    return join(root, _step_name(step) + _TMP_SUFFIX)


def renames_atomically(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def staging_path(fs: fsspec.AbstractFileSystem, root: str, step: int) -> str:
    """Where a save or a copy of ``step`` writes before its commit: a ``.tmp`` dir on a local
    disk, the step's own dir on an object store."""
    return tmp_dir(root, step) if renames_atomically(fs) else step_dir(root, step)


def prepare_staging(fs: fsspec.AbstractFileSystem, root: str, step: int) -> str:
    """staging_path, made ready to be written: on an object store, debris of an earlier
    crashed save there is removed first, and a checkpoint there that verifies is never
    written over (FileExistsError), as commit() would refuse to replace it."""
    if renames_atomically(fs):
        return tmp_dir(root, step)
    final = step_dir(root, step)
    fs.invalidate_cache(final)
    _clear_for_commit(fs, final)
    return final


def _clear_for_commit(fs: fsspec.AbstractFileSystem, final_path: str) -> None:
    """Make room for a checkpoint at final_path: debris there goes, a good one stays."""
    if not fs.exists(final_path):
        return
    try:
        verify(fs, final_path, check_hashes=True)
    except CheckpointInvalid:
        # Debris of an earlier crashed commit (e.g. a half-finished object-store copy); it
        # can never be loaded, so replacing it loses nothing.
        remove_tree(fs, final_path)
    else:
        # A good checkpoint for this step already exists (e.g. a retried save after a
        # preemption); silently swapping it would change history under readers.
        raise FileExistsError(f"verified checkpoint already exists at {final_path}")


def parse_step(name: str) -> int | None:
    """Step number of a committed dir name (``step-000000042`` -> 42), else None."""
    m = _STEP_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def _list_dirs(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Base names of the directories directly under root; [] if root does not exist."""
    fs.invalidate_cache(root)  # other hosts may have committed since we last looked
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return []
    return [
        posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory"
    ]


def commit(
    fs: fsspec.AbstractFileSystem,
    tmp_path: str,
    final_path: str,
    check_hashes: bool = True,
) -> None:
    """Publish a fully written ``tmp_path`` as ``final_path``.

    ``check_hashes=False`` verifies the new checkpoint's sizes only, for callers whose manifest
    hashes were computed by the writing ranks and who do not want to re-read the checkpoint.
    An existing final_path is always checked in full: a same-size corruption must not pass
    for a good checkpoint and block the new one.
    """
    verify(fs, tmp_path, check_hashes=check_hashes)  # raises CheckpointInvalid
    if tmp_path == final_path:
        return  # written in place on an object store: the manifest, written last, committed it
    _clear_for_commit(fs, final_path)
    rename_dir(fs, tmp_path, final_path)


def _has_manifest(fs: fsspec.AbstractFileSystem, root: str, step: int) -> bool:
    path = step_dir(root, step)
    fs.invalidate_cache(path)  # a listing cached mid-save would hide the manifest for good
    return fs.exists(join(path, MANIFEST_NAME))


def committed_steps(fs: fsspec.AbstractFileSystem, root: str) -> list[int]:
    """Steps whose final directory exists (not verified), newest first; on an object store,
    only those whose manifest is there (a save in flight writes in place)."""
    parsed = (parse_step(name) for name in _list_dirs(fs, root))
    steps = sorted((s for s in parsed if s is not None), reverse=True)
    if renames_atomically(fs):
        return steps
    return [s for s in steps if _has_manifest(fs, root, s)]


class CheckpointNotFound(FileNotFoundError):
    """The committed step a run was told to resume from is not there (or does not verify).

    A FileNotFoundError, so it counts as infrastructure (storage), never as the user's error:
    the controller named a step it had verified."""


def require_step(
    fs: fsspec.AbstractFileSystem, root: str, step: int, check_hashes: bool = True
) -> str:
    """The path of committed ``step`` once it verifies; CheckpointNotFound naming the step and
    the storage URL otherwise. No fallback to another step: the caller asked for this one."""
    url = fs.unstrip_protocol(root)
    if step not in committed_steps(fs, root):
        raise CheckpointNotFound(f"checkpoint step {step} is not committed in {url}")
    path = step_dir(root, step)
    try:
        verify(fs, path, check_hashes=check_hashes)
    except CheckpointInvalid as e:
        raise CheckpointNotFound(f"checkpoint step {step} in {url} does not verify: {e}") from e
    return path


def committed_manifests(
    fs: fsspec.AbstractFileSystem,
    root: str,
    warn: Callable[[str], None] = logger.warning,
) -> dict[int, tuple[str, int | None]]:
    """Each committed step -> (digest of its manifest's exact bytes, the committing epoch).

    The digest is manifest.digest_of's (``"blake3:<hex>"``): what the controller records when a
    step is committed, to check a later copy against (manifest.check_digest). Each
    manifest is read once and parsed for shape only; its files are not read here (a copy
    verifies them against the bytes whose digest was recorded). A step whose manifest is gone
    (pruned meanwhile) or does not parse is left out, with a warning for the latter.
    """
    out: dict[int, tuple[str, int | None]] = {}
    for step in committed_steps(fs, root):
        path = step_dir(root, step)
        try:
            raw = read_manifest_bytes(fs, path)
            doc = parse_manifest(path, raw)
        except CheckpointInvalid as e:
            if e.reason != "is missing":
                warn(f"not recording checkpoint {e}")
            continue
        out[step] = (digest_of(raw), manifest_epoch(doc))
    return out


def remove_superseded(
    fs: fsspec.AbstractFileSystem,
    root: str,
    step: int,
    epoch: int,
    warn: Callable[[str], None] = logger.warning,
) -> bool:
    """Make room for a save of ``step`` by an attempt of ``epoch`` that holds the job's fence.

    A checkpoint already committed at that step by an older epoch (or by none: a run by hand)
    is a superseded line's, such as a zombie's, which the controller never resumes from; left
    there, commit would refuse to replace it and the new line could never pass that step. It
    is removed (True). One of this epoch or newer is left for commit to refuse (False).
    """
    path = step_dir(root, step)
    fs.invalidate_cache(path)
    try:
        doc = parse_manifest(path, read_manifest_bytes(fs, path))
    except CheckpointInvalid:
        return False  # no committed checkpoint there: debris is cleared by prepare_staging
    old = manifest_epoch(doc)
    if old is not None and old >= epoch:
        return False
    warn(f"removing checkpoint step {step} of epoch {old}: a superseded line (this is {epoch})")
    remove_tree(fs, path)
    return True


def latest_verified(
    fs: fsspec.AbstractFileSystem,
    root: str,
    warn: Callable[[str], None] = logger.warning,
    check_hashes: bool = True,
) -> tuple[int, str] | None:
    """Newest checkpoint that verifies, as (step, path); None if there is none.

    Only CheckpointInvalid causes a fallback: other errors (auth, network) propagate,
    because silently resuming from an older step on a transient error loses work.
    """
    steps = committed_steps(fs, root)
    for i, step in enumerate(steps):
        path = step_dir(root, step)
        try:
            verify(fs, path, check_hashes=check_hashes)
        except CheckpointInvalid as e:
            then = "using an earlier one" if i + 1 < len(steps) else "no earlier checkpoint left"
            warn(f"skipping checkpoint {e}; {then}")
            continue
        return step, path
    return None


def prune(
    fs: fsspec.AbstractFileSystem, root: str, keep: int, epoch: int | None = None
) -> list[int]:
    """Keep the newest ``keep`` valid checkpoints, delete committed dirs older than them
    (`prune_plan`, then `remove_steps`); returns the deleted steps, newest first."""
    deleted = prune_plan(fs, root, keep, epoch)
    remove_steps(fs, root, deleted)
    return deleted


def remove_steps(fs: fsspec.AbstractFileSystem, root: str, steps: list[int]) -> None:
    """Delete the step dirs at `steps` (one already gone is not an error)."""
    for step in steps:
        remove_tree(fs, step_dir(root, step))


def prune_plan(
    fs: fsspec.AbstractFileSystem, root: str, keep: int, epoch: int | None = None
) -> list[int]:
    """The steps `prune` deletes, newest first, deleting nothing: keep the newest ``keep``
    valid checkpoints, and every step dir older than them goes.

    Invalid dirs newer than the oldest kept one are left for inspection. If fewer than
    ``keep`` valid checkpoints exist nothing is deleted: we are below the retention
    target, so nothing is surplus. ``epoch``: only checkpoints committed by that epoch count
    as kept (the controller's retention of the current attempt's line: a zombie's newer steps
    or a copied-in older line never stand in for the current one's).
    """
    if keep < 1:
        # keep=0 would delete the only thing a restarted job can resume from.
        raise ValueError(f"keep must be >= 1, got {keep}")
    # Every step dir, committed or not: on an object store one older than the kept ones that
    # has no manifest is a crashed save, debris like any invalid one.
    parsed = (parse_step(name) for name in _list_dirs(fs, root))
    steps = sorted((s for s in parsed if s is not None), reverse=True)
    kept: list[int] = []
    for step in steps:
        try:
            # Sizes catch truncated uploads; full hashing every save would re-read
            # the whole retention window.
            doc = verify(fs, step_dir(root, step), check_hashes=False)
        except CheckpointInvalid:
            continue
        if epoch is not None and manifest_epoch(doc) != epoch:
            continue
        kept.append(step)
        if len(kept) == keep:
            break
    if len(kept) < keep:
        return []
    oldest_kept = kept[-1]
    return [s for s in steps if s < oldest_kept]


def remove_stale_tmp(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Delete every unfinished save under root (``*.tmp`` dirs; on an object store, step
    dirs without a manifest); returns their names.

    Only safe when no save is in flight (e.g. at job start, before training), since an
    in-progress save is indistinguishable from a crashed one.
    """
    dirs = _list_dirs(fs, root)
    names = sorted(n for n in dirs if n.endswith(_TMP_SUFFIX))
    if not renames_atomically(fs):
        for name in dirs:
            step = parse_step(name)
            if step is not None and not _has_manifest(fs, root, step):
                names.append(name)
    for name in names:
        remove_tree(fs, join(root, name))
    return names
