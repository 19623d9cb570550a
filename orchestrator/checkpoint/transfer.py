"""Copy a committed checkpoint from one storage root to another, as migration does.

The source and target are fsspec URLs and may be different filesystems (local disk on the
source cluster, an object store or memory:// on the target). The copy goes through the same
protocol as a save: every file listed in the source manifest is streamed into the target's
``step-N.tmp/`` (on an object store, ``step-N/``), hashed on the fly with the manifest's own
algorithm (BLAKE3, or sha256 for a manifest written before) and checked against the manifest as
it arrives, the manifest is written last, and only then is the directory committed. A copy that
fails, or whose bytes do not match, is never committed, so the target can only ever expose a
checkpoint that verifies.

Hashing overlaps the I/O: each chunk is hashed on a second thread while this one writes it and
reads the next, and a BLAKE3 update spreads over the cores besides (hashing.new_hasher). On a
local target the chunks are read into two reused buffers (fresh 8 MiB buffers cost page faults
that showed in the copy's time); other filesystems get fresh ones, since a writer might keep a
reference to what it was given.

The source may be a partner's bucket, and a partner can rewrite a manifest to match any bytes.
So the source manifest is read exactly once; when the caller has the digest recorded at commit
time, those bytes are checked against it before anything else is parsed or copied, and every
file is then checked against those same bytes, which are also the ones written to the target.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import fsspec

from orchestrator.checkpoint import catalog, hashing
from orchestrator.checkpoint.manifest import (
    MANIFEST_NAME,
    CheckpointInvalid,
    FileEntry,
    check_digest,
    entries,
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
    return sorted(entries(a), key=lambda e: e.path) == sorted(entries(b), key=lambda e: e.path)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in fs.protocol or "local" in fs.protocol


class _Chunks:
    """Chunks of one source file, read ahead of the one being hashed and written.

    ``reuse``: read into two buffers in turn (the caller is done with a chunk, hashed and
    written, before asking for the one after next); otherwise each chunk is a fresh bytes."""

    def __init__(self, fin: Any, chunk_bytes: int, reuse: bool) -> None:
        self._fin, self._n = fin, chunk_bytes
        self._bufs = [bytearray(chunk_bytes), bytearray(chunk_bytes)] if reuse else None
        self._turn = 0

    def next(self) -> bytes | memoryview:
        if self._bufs is None:
            return self._fin.read(self._n)
        buf = self._bufs[self._turn]
        self._turn ^= 1
        got = self._fin.readinto(buf) or 0
        return memoryview(buf)[:got]


class _NoKernelCopy(Exception):
    """sendfile cannot copy between these two files (raised before any byte was copied)."""


# sendfile between two regular files: Linux only (elsewhere its target must be a socket).
_KERNEL_COPY = sys.platform == "linux" and hasattr(os, "sendfile")
_NO_SENDFILE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOTSOCK}


def _sendfile(fout: int, fin: int, count: int, first: bool) -> int:
    """Up to ``count`` bytes from fin's position to fout's, in the kernel; 0 at the end."""
    done = 0
    while done < count:
        try:
            n = os.sendfile(fout, fin, None, count - done)
        except OSError as e:
            if first and done == 0 and e.errno in _NO_SENDFILE:
                raise _NoKernelCopy from e
            raise
        if n == 0:
            break
        done += n
    return done


def _check_size(entry: FileEntry, src_dir: str, size: int) -> None:
    if size > entry.size:
        raise CheckpointInvalid(src_dir, entry.path, f"has more than the {entry.size} bytes listed")


def _check_file(entry: FileEntry, src_dir: str, size: int, got: str) -> None:
    if size != entry.size:
        raise CheckpointInvalid(
            src_dir, entry.path, f"has {size} bytes, manifest says {entry.size}"
        )
    if got != entry.hexdigest:
        raise CheckpointInvalid(
            src_dir, entry.path, f"has {entry.algorithm} {got}, manifest says {entry.hexdigest}"
        )


# Disk to disk, the hash reads back each chunk just copied: one that fits in a core's cache
# is hashed from there, not from memory. Measured here (2 MiB L2 a core, 32 MiB L3): verified/
# plain 0.83 with 1 MiB chunks, 0.73 with 8 MiB, 0.40 with 32 MiB.
KERNEL_COPY_CHUNK = 1 << 20


def _copy_local(
    src: str,
    dst: str,
    entry: FileEntry,
    src_dir: str,
    chunk_bytes: int,
    advance: Callable[[int], None],
    hasher: ThreadPoolExecutor,
) -> None:
    """Disk to disk: each chunk is copied in the kernel (sendfile, as a plain copy is), and the
    hash thread reads the chunk back from the target (the page cache) and hashes it while the
    next chunk is copied: what is checked is what landed on the target."""
    digest = hashing.new_hasher(entry.algorithm, hashing.spare_threads())
    # One chunk hashed at a time (waited for before the next is submitted): one buffer. A file
    # smaller than a chunk needs its size, and one byte more to tell one longer than listed.
    buf = memoryview(bytearray(min(chunk_bytes, entry.size + 1)))

    def hash_back(fd: int, offset: int, n: int) -> None:
        # Mapped, not read: the hash reads the target's page cache in place, without the copy
        # into a buffer that cost about as much as the hash itself (offsets are whole chunks,
        # so page-aligned; sendfile just wrote these n bytes, so the file holds them).
        if offset % mmap.ALLOCATIONGRANULARITY == 0:
            with mmap.mmap(fd, n, access=mmap.ACCESS_READ, offset=offset) as mapped:
                digest.update(mapped)
            return
        while n > 0:
            got = os.preadv(fd, [buf[:n]], offset)
            if got == 0:
                raise CheckpointInvalid(src_dir, entry.path, "was cut short on the target")
            digest.update(buf[:got])
            offset, n = offset + got, n - got

    size = 0
    pending: Future[None] | None = None
    try:
        # "w+b": the hash thread reads the target's bytes back through the same descriptor.
        with open(src, "rb") as fin, open(dst, "w+b") as fout:
            while True:
                n = _sendfile(fout.fileno(), fin.fileno(), len(buf), first=size == 0)
                if pending is not None:
                    pending.result()
                    pending = None
                if n == 0:
                    break
                pending = hasher.submit(hash_back, fout.fileno(), size, n)
                size += n
                _check_size(entry, src_dir, size)
                advance(n)
    finally:
        if pending is not None:
            wait([pending])  # leave no hashing behind an error
    _check_file(entry, src_dir, size, digest.hexdigest())


def _copy_file(
    fs_src: fsspec.AbstractFileSystem,
    src: str,
    fs_dst: fsspec.AbstractFileSystem,
    dst: str,
    entry: FileEntry,
    src_dir: str,
    chunk_bytes: int,
    advance: Callable[[int], None],
    hasher: ThreadPoolExecutor,
) -> None:
    """Stream one file in ``chunk_bytes`` pieces, hashing what is written; raise on mismatch.

    The hash (``entry.algorithm``) runs on ``hasher``'s thread while this one writes the chunk
    and reads the next (the hashers and file I/O all release the GIL), so hashing overlaps I/O
    instead of adding to it. At most two chunks are held: the one being hashed and written, and
    the next one read. Disk to disk, the bytes never pass through this process (_copy_local).
    """
    if _KERNEL_COPY and _is_local(fs_src) and _is_local(fs_dst):
        local_src, local_dst = fs_src._strip_protocol(src), fs_dst._strip_protocol(dst)
        try:
            chunk = min(chunk_bytes, KERNEL_COPY_CHUNK)
            return _copy_local(local_src, local_dst, entry, src_dir, chunk, advance, hasher)
        except _NoKernelCopy:
            pass  # e.g. a filesystem without sendfile support: stream it instead
    digest = hashing.new_hasher(entry.algorithm, hashing.spare_threads())
    size = 0
    pending: Future[None] | None = None
    try:
        with fs_src.open(src, "rb") as fin, fs_dst.open(dst, "wb") as fout:
            # A file smaller than a chunk needs no more than its size, and one byte more to
            # tell a file longer than listed.
            chunks = _Chunks(fin, min(chunk_bytes, entry.size + 1), reuse=_is_local(fs_dst))
            while True:
                chunk = chunks.next()
                if pending is not None:
                    pending.result()  # updates must reach the digest in order
                    pending = None
                if not chunk:
                    break
                size += len(chunk)
                _check_size(entry, src_dir, size)
                pending = hasher.submit(digest.update, chunk)
                fout.write(chunk)
                advance(len(chunk))
    finally:
        if pending is not None:
            wait([pending])  # leave no hashing behind an error
    _check_file(entry, src_dir, size, digest.hexdigest())


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
    for entry in entries(doc):
        dst = join(tmp, entry.path)
        parent = dst.rsplit("/", 1)[0]
        if parent not in made:
            fs_dst.makedirs(parent, exist_ok=True)  # local disk needs parents; stores ignore it
            made.add(parent)
        _copy_file(
            fs_src,
            join(src_dir, entry.path),
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

    ``expected_manifest_digest``: the digest of the step's manifest recorded when it was
    committed (manifest.manifest_digest: ``"blake3:<hex>"``, or a bare sha256 hex as recorded
    before digests named their algorithm). A source manifest with another digest raises
    ``CheckpointInvalid`` before any other byte of the source is read, and is not retried; a
    digest in neither form raises ValueError before anything is read.

    Returns without copying (``bytes=0``, ``attempts=0``) when the target already has the step
    committed with the same manifest and every hash verifies, so a controller that restarts
    mid-migration can simply call this again. A target step that exists but does not verify is
    replaced; one that verifies but lists other files raises ``FileExistsError``.

    Each file is streamed in ``chunk_bytes`` pieces and its size and hash (by the manifest's
    algorithm) are checked against the source manifest as it arrives; the target is committed with sizes-only verification
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
    if expected_manifest_digest is not None:
        hashing.parse_digest(expected_manifest_digest)  # ValueError, before any read
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
    # One hash thread: a file's updates must reach its digest in order; BLAKE3 spreads each
    # update over the cores this thread's copying leaves (hashing.spare_threads).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-hash") as hasher:
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
