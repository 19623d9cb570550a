"""Copy a committed checkpoint from one storage root to another, as migration does.

The source and target are fsspec URLs and may be different filesystems (local disk on the
source cluster, an object store or memory:// on the target). The copy goes through the same
protocol as a save: every file listed in the source manifest is streamed into the target's
``step-N.tmp/`` (on an object store, ``step-N/``), hashed on the fly and checked against the
manifest as it arrives, the manifest is written last, and only then is the directory committed. A
copy that fails, or whose bytes do not match, is never committed, so the target can only ever
expose a checkpoint that verifies.

The source may be a partner's bucket, and a partner can rewrite a manifest to match any bytes.
So the source manifest is read exactly once; when the caller has the digest recorded at commit
time, those bytes are checked against it before anything else is parsed or copied, and every
file is then checked against those same bytes, which are also the ones written to the target.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import fsspec

from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.manifest import (
    MANIFEST_NAME,
    CheckpointInvalid,
    check_digest,
    read_manifest_bytes,
    verify,
)
from orchestrator.checkpoint.storage import join, open_root, remove_tree

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

# Seconds before retrying after an I/O error (doubled per attempt, capped); a byte mismatch is
# retried at once. Module-level so tests can set it to 0.
RETRY_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 10.0


@dataclass
class CopyResult:
    step: int
    files: int  # data files listed in the manifest (the manifest itself not counted)
    bytes: int  # bytes copied: 0 when the target already had the step
    seconds: float  # wall time of the whole call, retries included
    attempts: int  # copy attempts made: 0 when the target already had the step

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


def _pick_step(fs: fsspec.AbstractFileSystem, root: str, step: int | None) -> int:
    if step is not None:
        if step not in catalog.committed_steps(fs, root):
            raise FileNotFoundError(f"no committed checkpoint for step {step} under {root}")
        return step
    # Sizes only: every byte is hashed on the way to the target anyway, and hashing the
    # source here as well would read the whole checkpoint twice.
    found = catalog.latest_verified(fs, root, check_hashes=False)
    if found is None:
        raise FileNotFoundError(f"no verified checkpoint to copy under {root}")
    return found[0]


def _same_files(a: dict[str, Any], b: dict[str, Any]) -> bool:
    key = lambda doc: sorted((f["path"], f["size"], f["sha256"]) for f in doc["files"])  # noqa: E731
    return key(a) == key(b)


def _copy_file(
    fs_src: fsspec.AbstractFileSystem,
    src: str,
    fs_dst: fsspec.AbstractFileSystem,
    dst: str,
    entry: dict[str, Any],
    src_dir: str,
    chunk_bytes: int,
    advance: Callable[[int], None],
    hasher: ThreadPoolExecutor,
) -> None:
    """Stream one file in ``chunk_bytes`` pieces, hashing what is written; raise on mismatch.

    sha256 runs on ``hasher``'s thread while this one writes the chunk and reads the next
    (hashlib and file I/O both release the GIL), so hashing overlaps I/O instead of adding to
    it. At most two chunks are held: the one being hashed and written, and the next one read.
    """
    rel, want_size, want_sha = entry["path"], entry["size"], entry["sha256"]
    digest = hashlib.sha256()
    size = 0
    pending: Future[None] | None = None
    try:
        with fs_src.open(src, "rb") as fin, fs_dst.open(dst, "wb") as fout:
            while True:
                chunk = fin.read(chunk_bytes)
                if pending is not None:
                    pending.result()  # updates must reach the digest in order
                    pending = None
                if not chunk:
                    break
                size += len(chunk)
                if size > want_size:
                    raise CheckpointInvalid(
                        src_dir, rel, f"has more than the {want_size} bytes listed"
                    )
                pending = hasher.submit(digest.update, chunk)
                fout.write(chunk)
                advance(len(chunk))
    finally:
        if pending is not None:
            wait([pending])  # leave no hashing behind an error
    if size != want_size:
        raise CheckpointInvalid(src_dir, rel, f"has {size} bytes, manifest says {want_size}")
    got = digest.hexdigest()
    if got != want_sha:
        raise CheckpointInvalid(src_dir, rel, f"has sha256 {got}, manifest says {want_sha}")


def _copy_once(
    fs_src: fsspec.AbstractFileSystem,
    src_dir: str,
    fs_dst: fsspec.AbstractFileSystem,
    tmp: str,
    doc: dict[str, Any],
    raw: bytes,
    chunk_bytes: int,
    advance: Callable[[int], None],
    hasher: ThreadPoolExecutor,
) -> None:
    """Fill ``tmp`` with the files ``doc`` lists, then the manifest ``raw`` it was parsed from;
    the caller commits or cleans up."""
    remove_tree(fs_dst, tmp)  # a stale tmp from a crashed copy or save would be mixed in
    fs_dst.makedirs(tmp, exist_ok=True)
    made = {tmp}
    for entry in doc["files"]:
        dst = join(tmp, entry["path"])
        parent = dst.rsplit("/", 1)[0]
        if parent not in made:
            fs_dst.makedirs(parent, exist_ok=True)  # local disk needs parents; stores ignore it
            made.add(parent)
        _copy_file(
            fs_src,
            join(src_dir, entry["path"]),
            fs_dst,
            dst,
            entry,
            src_dir,
            chunk_bytes,
            advance,
            hasher,
        )
    # The bytes the files were checked against, not a second read of the source's manifest.
    with fs_dst.open(join(tmp, MANIFEST_NAME), "wb") as f:
        f.write(raw)


def copy_checkpoint(
    src_url: str,
    dst_url: str,
    step: int | None = None,
    *,
    retries: int = 2,
    chunk_bytes: int = 8 << 20,
    progress: Progress | None = None,
    limit_bytes_per_s: float | None = None,
    src_options: dict[str, Any] | None = None,
    dst_options: dict[str, Any] | None = None,
    expected_manifest_digest: str | None = None,
) -> CopyResult:
    """Copy committed checkpoint ``step`` (default: the source's newest that verifies by size).

    ``expected_manifest_digest``: the sha256 of the step's manifest recorded when it was
    committed (manifest.manifest_digest). A source manifest with another digest raises
    ``CheckpointInvalid`` before any other byte of the source is read, and is not retried.

    Returns without copying (``bytes=0``, ``attempts=0``) when the target already has the step
    committed with the same manifest and every hash verifies, so a controller that restarts
    mid-migration can simply call this again. A target step that exists but does not verify is
    replaced; one that verifies but lists other files raises ``FileExistsError``.

    Each file is streamed in ``chunk_bytes`` pieces and its size and sha256 are checked against
    the source manifest as it arrives; the target is committed with sizes-only verification
    because the hashes were checked on the way. A mismatch (``CheckpointInvalid``) or an I/O
    error (``OSError``) removes the target's tmp dir and restarts the whole copy, at most
    ``retries`` more times; then the error propagates and nothing is committed on the target.

    ``progress(bytes_done, bytes_total)`` is called after every chunk (``bytes_done`` starts again
    from 0 on a retry) and with ``(total, total)`` when the target already had the step.

    ``limit_bytes_per_s`` caps the copy rate (so a migration does not saturate a shared link):
    the copy sleeps after a chunk whenever it is ahead of that rate.

    Only one copy into a given target step may run at a time: each attempt deletes the target's
    ``step-N.tmp/`` first.
    """
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    if expected_manifest_digest is not None and step is None:
        # A digest is recorded for one step; "the newest" might be another one.
        raise ValueError("expected_manifest_digest needs the step it was recorded for")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    if limit_bytes_per_s is not None:
        if limit_bytes_per_s <= 0:
            raise ValueError(f"limit_bytes_per_s must be > 0, got {limit_bytes_per_s}")
        # Small enough chunks that the rate holds within a quarter of a second.
        chunk_bytes = max(1, min(chunk_bytes, int(limit_bytes_per_s / 4)))
    began = time.perf_counter()
    fs_src, src_root = open_root(src_url, src_options)
    fs_dst, dst_root = open_root(dst_url, dst_options)
    step = _pick_step(fs_src, src_root, step)
    src_dir = catalog.step_dir(src_root, step)
    raw = read_manifest_bytes(fs_src, src_dir)  # the one read of the source manifest
    if expected_manifest_digest is not None:
        check_digest(src_dir, raw, expected_manifest_digest)
    doc = verify(fs_src, src_dir, check_hashes=False, raw=raw)  # presence and sizes
    total = sum(f["size"] for f in doc["files"])
    nfiles = len(doc["files"])

    final = catalog.step_dir(dst_root, step)
    fs_dst.invalidate_cache(dst_root)
    if fs_dst.exists(final):
        try:
            have = verify(fs_dst, final, check_hashes=True)
        except CheckpointInvalid as e:
            # Debris of a crashed commit; catalog.commit replaces it once the copy verifies.
            logger.warning("target has an invalid checkpoint %s; copying over it", e)
        else:
            if not _same_files(have, doc):
                raise FileExistsError(
                    f"{final} already holds a verified checkpoint for step {step} "
                    f"with different files than {src_dir}"
                )
            if progress is not None:
                progress(total, total)
            return CopyResult(step, nfiles, 0, time.perf_counter() - began, 0)

    tmp = catalog.prepare_staging(fs_dst, dst_root, step)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-sha256") as hasher:
        attempt = 0
        done = 0
        attempt_began = 0.0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if limit_bytes_per_s is not None:
                ahead = attempt_began + done / limit_bytes_per_s - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
            if progress is not None:
                progress(done, total)

        while True:
            attempt += 1
            done = 0
            attempt_began = time.perf_counter()

            try:
                _copy_once(fs_src, src_dir, fs_dst, tmp, doc, raw, chunk_bytes, advance, hasher)
                catalog.commit(fs_dst, tmp, final, check_hashes=False)
            except BaseException as e:
                # Whatever went wrong (a bad byte, I/O, a raising progress callback, Ctrl-C),
                # a partial copy must not linger where a later commit could pick it up.
                remove_tree(fs_dst, tmp)
                # FileExistsError: a verified checkpoint appeared at `final` meanwhile (another
                # copier won); retrying cannot help.
                retryable = isinstance(e, (CheckpointInvalid, OSError)) and not isinstance(
                    e, FileExistsError
                )
                if not retryable or attempt > retries:
                    raise
                logger.warning(
                    "copy of step %d attempt %d/%d failed (%s); retrying",
                    step,
                    attempt,
                    retries + 1,
                    e,
                )
                if not isinstance(e, CheckpointInvalid):
                    time.sleep(min(RETRY_BACKOFF_S * 2 ** (attempt - 1), _MAX_BACKOFF_S))
                continue
            if progress is not None and total == 0:
                progress(0, 0)
            return CopyResult(step, nfiles, total, time.perf_counter() - began, attempt)


def plain_copy(
    src_url: str,
    dst_url: str,
    step: int,
    src_options: dict[str, Any] | None = None,
    dst_options: dict[str, Any] | None = None,
) -> float:
    """Seconds to copy the files of committed ``step`` with no hashing or checks (a baseline).

    Uses the filesystems' own copy: ``cp_file`` within one filesystem (``shutil.copyfile`` on
    local disk, a server-side copy on object stores), ``put_file``/``get_file`` between local
    disk and another filesystem, a plain stream otherwise. The files land in the target's
    ``step-N.tmp/``, uncommitted; the caller deletes them.
    """
    fs_src, src_root = open_root(src_url, src_options)
    fs_dst, dst_root = open_root(dst_url, dst_options)
    src_dir = catalog.step_dir(src_root, step)
    with fs_src.open(join(src_dir, MANIFEST_NAME), "rb") as f:
        rels = [e["path"] for e in json.loads(f.read())["files"]] + [MANIFEST_NAME]
    tmp = catalog.tmp_dir(dst_root, step)  # a name no store lists as a checkpoint
    remove_tree(fs_dst, tmp)

    def is_local(fs: fsspec.AbstractFileSystem) -> bool:
        return "file" in fs.protocol or "local" in fs.protocol

    began = time.perf_counter()
    for rel in rels:
        src, dst = join(src_dir, rel), join(tmp, rel)
        fs_dst.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
        if fs_src is fs_dst:
            fs_src.cp_file(src, dst)
        elif is_local(fs_src):
            fs_dst.put_file(src, dst)
        elif is_local(fs_dst):
            fs_src.get_file(src, dst)
        else:
            with fs_src.open(src, "rb") as fin, fs_dst.open(dst, "wb") as fout:
                while chunk := fin.read(8 << 20):
                    fout.write(chunk)
    return time.perf_counter() - began
