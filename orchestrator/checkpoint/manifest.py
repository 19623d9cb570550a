"""Checkpoint manifests: what a committed checkpoint directory must contain.

The manifest is the only thing that makes a directory trustworthy: a save can die at
any point, and object stores have no atomic directory rename, so readers verify the
listed sizes/hashes instead of trusting that a directory exists. A manifest written on a
partner proves nothing against that partner, though: the controller records the digest of the
manifest's exact bytes (manifest_digest) when the step is committed, and a copy checks the
manifest against it before anything else is read (transfer.copy_checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import asdict, dataclass
from typing import Any

import fsspec

from orchestrator.checkpoint.storage import join

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_VERSION = 1

# Large enough to keep object-store round trips few, small enough that hashing a
# multi-GB shard never holds more than this in memory.
_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative posix path inside the checkpoint directory
    size: int
    sha256: str


class CheckpointInvalid(Exception):
    """A checkpoint directory that must not be loaded, with the file that proves it."""

    def __init__(self, dir_path: str, file: str, reason: str) -> None:
        # Passing everything to Exception keeps the error picklable (Ray re-raises
        # worker exceptions on the driver by pickling them).
        super().__init__(dir_path, file, reason)
        self.dir_path = dir_path
        self.file = file
        self.reason = reason

    def __str__(self) -> str:
        return f"{posixpath.basename(self.dir_path.rstrip('/'))}: {self.file} {self.reason}"


def _norm(fs: fsspec.AbstractFileSystem, path: str) -> str:
    # fs.find returns paths in the filesystem's canonical spelling; normalise ours the
    # same way so stripping the prefix yields clean relative paths.
    return fs._strip_protocol(path).rstrip("/")


def hash_file(fs: fsspec.AbstractFileSystem, path: str, rel: str) -> FileEntry:
    """Hash ``path`` in fixed-size chunks; ``rel`` is the name recorded in the manifest."""
    digest = hashlib.sha256()
    size = 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    # Size is counted from the bytes actually hashed so the two can never disagree.
    return FileEntry(path=rel, size=size, sha256=digest.hexdigest())


def list_files(fs: fsspec.AbstractFileSystem, dir_path: str) -> list[str]:
    """Relative posix paths of every file under ``dir_path`` (recursive), minus the manifest."""
    base = _norm(fs, dir_path)
    # Listing caches (s3fs, gcsfs) can predate files the ranks just wrote.
    fs.invalidate_cache(base)
    prefix = base + "/"
    out = []
    for full in fs.find(base):
        full = full.rstrip("/")
        if not full.startswith(prefix):
            raise RuntimeError(f"{fs.protocol} find() returned {full!r} outside {base!r}")
        rel = full[len(prefix) :]
        if rel != MANIFEST_NAME:
            out.append(rel)
    return sorted(out)


def write_manifest(
    fs: fsspec.AbstractFileSystem,
    dir_path: str,
    entries: list[FileEntry],
    meta: dict[str, Any] | None = None,
    epoch: int | None = None,
) -> None:
    """Write ``MANIFEST.json``; refuses unless ``entries`` cover exactly the files present.

    ``epoch`` is the committing attempt's (None for a run by hand), so the controller can tell
    whose line a checkpoint belongs to."""
    listed = [e.path for e in entries]
    dupes = sorted({p for p in listed if listed.count(p) > 1})
    if dupes:
        raise ValueError(f"manifest for {dir_path} lists files more than once: {dupes}")
    present = set(list_files(fs, dir_path))
    unlisted = sorted(present - set(listed))
    absent = sorted(set(listed) - present)
    if unlisted or absent:
        # Either way the manifest would describe a checkpoint other than the one on
        # storage, and committing it would bless a partial or polluted save.
        raise ValueError(
            f"manifest for {dir_path} does not match its files: "
            f"present but not listed {unlisted}, listed but absent {absent}"
        )
    doc = {
        "version": MANIFEST_VERSION,
        "files": [asdict(e) for e in sorted(entries, key=lambda e: e.path)],
        "meta": dict(meta or {}),
        "epoch": epoch,
    }
    # Serialise before opening so a non-JSON meta fails without leaving a truncated file.
    data = json.dumps(doc, indent=1, sort_keys=True).encode()
    with fs.open(join(dir_path, MANIFEST_NAME), "wb") as f:
        f.write(data)


def build_manifest(
    fs: fsspec.AbstractFileSystem,
    dir_path: str,
    meta: dict[str, Any] | None = None,
    precomputed: dict[str, FileEntry] | None = None,
    epoch: int | None = None,
) -> list[FileEntry]:
    """Hash every file not already in ``precomputed``, write the manifest, return entries.

    ``precomputed`` lets ranks hash their own shards while the bytes are hot instead of
    rank 0 re-reading the whole checkpoint from storage.
    """
    precomputed = dict(precomputed or {})
    for key, entry in precomputed.items():
        if key != entry.path:
            raise ValueError(f"precomputed key {key!r} does not match entry path {entry.path!r}")
    entries = []
    for rel in list_files(fs, dir_path):
        entry = precomputed.pop(rel, None)
        entries.append(entry if entry is not None else hash_file(fs, join(dir_path, rel), rel))
    # Leftover precomputed entries name files a rank reported but that are not on
    # storage; pass them on so write_manifest rejects the partial checkpoint.
    entries.extend(precomputed.values())
    write_manifest(fs, dir_path, entries, meta, epoch)
    return entries


def read_manifest_bytes(fs: fsspec.AbstractFileSystem, dir_path: str) -> bytes:
    """The manifest's exact bytes; CheckpointInvalid if there is none."""
    path = join(dir_path, MANIFEST_NAME)
    fs.invalidate_cache(_norm(fs, dir_path))
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise CheckpointInvalid(dir_path, MANIFEST_NAME, "is missing") from e


def digest_of(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def manifest_digest(fs: fsspec.AbstractFileSystem, step_dir: str) -> str:
    """sha256 (hex) of the manifest file's exact bytes: what the controller records at commit."""
    return digest_of(read_manifest_bytes(fs, step_dir))


def check_digest(dir_path: str, raw: bytes, expected: str) -> None:
    """CheckpointInvalid unless ``raw`` is the manifest whose digest was recorded."""
    got = digest_of(raw)
    if got != expected:
        raise CheckpointInvalid(
            dir_path,
            MANIFEST_NAME,
            f"has sha256 {got[:12]}..., which does not match the digest recorded when it was "
            f"committed ({expected[:12]}...)",
        )


def manifest_epoch(doc: dict[str, Any]) -> int | None:
    """The epoch of the attempt that committed a parsed manifest (None: by hand, or older)."""
    return doc.get("epoch")


def _parse(dir_path: str, raw: bytes) -> dict[str, Any]:
    def bad(why: str) -> CheckpointInvalid:
        return CheckpointInvalid(dir_path, MANIFEST_NAME, why)

    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"is not valid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise bad("is not a JSON object")
    if doc.get("version") != MANIFEST_VERSION:
        raise bad(f"has unsupported version {doc.get('version')!r}")
    files = doc.get("files")
    if not isinstance(files, list):
        raise bad("has no 'files' list")
    for item in files:
        ok = (
            isinstance(item, dict)
            and isinstance(item.get("path"), str)
            and isinstance(item.get("size"), int)
            and isinstance(item.get("sha256"), str)
        )
        if not ok:
            raise bad(f"has a malformed file entry {item!r}")
        rel = item["path"]
        # A hand-edited or hostile manifest must not make us read outside the directory.
        if not rel or rel.startswith("/") or ".." in rel.split("/"):
            raise bad(f"lists an unsafe path {rel!r}")
    epoch = doc.get("epoch")
    if epoch is not None and (not isinstance(epoch, int) or isinstance(epoch, bool)):
        raise bad(f"has a malformed epoch {epoch!r}")
    return doc


def parse_manifest(dir_path: str, raw: bytes) -> dict[str, Any]:
    """The manifest in ``raw``, checked for shape only (not against any file)."""
    return _parse(dir_path, raw)


def verify(
    fs: fsspec.AbstractFileSystem,
    dir_path: str,
    check_hashes: bool = True,
    raw: bytes | None = None,
) -> dict[str, Any]:
    """Return the parsed manifest, or raise CheckpointInvalid naming the first bad file.

    ``check_hashes=False`` checks presence and sizes only, which catches truncated
    uploads without re-reading every byte. ``raw``: the manifest's bytes as the caller already
    read them (and checked against a recorded digest); the files are verified against exactly
    those, never against a second read that a hostile store could answer differently.
    """
    if raw is None:
        raw = read_manifest_bytes(fs, dir_path)
    doc = _parse(dir_path, raw)

    for item in doc["files"]:
        rel, want_size, want_sha = item["path"], item["size"], item["sha256"]
        full = join(dir_path, rel)
        try:
            info = fs.info(full)
        except FileNotFoundError as e:
            raise CheckpointInvalid(dir_path, rel, "is missing") from e
        if info.get("type") != "file":
            raise CheckpointInvalid(dir_path, rel, "is missing (found a directory)")
        if info.get("size") != want_size:
            raise CheckpointInvalid(
                dir_path, rel, f"has {info.get('size')} bytes, manifest says {want_size}"
            )
        if check_hashes:
            got = hash_file(fs, full, rel)
            if got.size != want_size:
                # The file changed between info() and the read; still not loadable.
                raise CheckpointInvalid(
                    dir_path, rel, f"has {got.size} bytes, manifest says {want_size}"
                )
            if got.sha256 != want_sha:
                raise CheckpointInvalid(
                    dir_path, rel, f"has sha256 {got.sha256}, manifest says {want_sha}"
                )
    return doc
