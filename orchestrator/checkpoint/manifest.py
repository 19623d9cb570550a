"""Checkpoint manifests: what a committed checkpoint directory must contain.

The manifest is the only thing that makes a directory trustworthy: a save can die at
any point, and object stores have no atomic directory rename, so readers verify the
listed sizes/hashes instead of trusting that a directory exists. A manifest written on a
partner proves nothing against that partner, though: the controller records the digest of the
manifest's exact bytes (manifest_digest) when the step is committed, and a copy checks the
manifest against it before anything else is read (transfer.copy_checkpoint).

The format (``MANIFEST.json``), version 2, which new checkpoints get::

    {"version": 2, "algorithm": "blake3", "epoch": 3, "meta": {...},
     "files": [{"path": "__0_0.distcp", "size": 123, "blake3": "<64 hex>"}, ...]}

Each file entry names its hash by the algorithm's own field name, the one ``"algorithm"``
names (hashing.ALGORITHMS: blake3, or sha256). Version 1, written before manifests named their
algorithm, is the same without ``"algorithm"``: sha256, in each entry's ``"sha256"``; it stays
readable and verifiable. A parsed manifest always carries ``"algorithm"`` (set to sha256 for
version 1), so callers read an entry's hash as ``item[doc["algorithm"]]``.

The digest of a manifest's bytes (digest_of) is spelled ``"blake3:<hex>"``; one recorded before
digests named their algorithm is a bare sha256 hex, and check_digest accepts both.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec

from orchestrator.checkpoint import hashing
from orchestrator.checkpoint.storage import join

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_VERSION = 2  # what write_manifest writes
_V1 = 1  # sha256 in every entry's "sha256", no "algorithm": still read and verified

# Large enough to keep object-store round trips few, small enough that hashing a
# multi-GB shard never holds more than this in memory.
_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative posix path inside the checkpoint directory
    size: int
    hexdigest: str  # of the file's bytes, by ``algorithm``
    algorithm: str = hashing.DEFAULT

    def to_json(self) -> dict[str, Any]:
        # The hash under its algorithm's name: an entry says what its hash is.
        return {"path": self.path, "size": self.size, self.algorithm: self.hexdigest}


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


def hash_file(
    fs: fsspec.AbstractFileSystem, path: str, rel: str, algorithm: str = hashing.DEFAULT
) -> FileEntry:
    """Hash ``path`` in fixed-size chunks; ``rel`` is the name recorded in the manifest."""
    digest = hashing.new_hasher(algorithm)
    size = 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    # Size is counted from the bytes actually hashed so the two can never disagree.
    return FileEntry(path=rel, size=size, hexdigest=digest.hexdigest(), algorithm=algorithm)


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
    algorithm: str = hashing.DEFAULT,
) -> None:
    """Write ``MANIFEST.json`` (version 2); refuses unless ``entries`` cover exactly the files
    present, each hashed with ``algorithm``.

    ``epoch`` is the committing attempt's (None for a run by hand), so the controller can tell
    whose line a checkpoint belongs to."""
    hashing.check_algorithm(algorithm)
    other = sorted(e.path for e in entries if e.algorithm != algorithm)
    if other:
        # One manifest, one algorithm: a reader checks every entry the same way.
        raise ValueError(f"manifest for {dir_path} is {algorithm}, but not these files: {other}")
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
        "algorithm": algorithm,
        "files": [e.to_json() for e in sorted(entries, key=lambda e: e.path)],
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
    algorithm: str = hashing.DEFAULT,
) -> list[FileEntry]:
    """Hash every file not already in ``precomputed``, write the manifest, return entries.

    ``precomputed`` lets ranks hash their own shards as they write them instead of rank 0
    re-reading the whole checkpoint from storage; it must use ``algorithm``.
    """
    precomputed = dict(precomputed or {})
    for key, entry in precomputed.items():
        if key != entry.path:
            raise ValueError(f"precomputed key {key!r} does not match entry path {entry.path!r}")
    entries = []
    for rel in list_files(fs, dir_path):
        entry = precomputed.pop(rel, None)
        if entry is None:
            entry = hash_file(fs, join(dir_path, rel), rel, algorithm)
        entries.append(entry)
    # Leftover precomputed entries name files a rank reported but that are not on
    # storage; pass them on so write_manifest rejects the partial checkpoint.
    entries.extend(precomputed.values())
    write_manifest(fs, dir_path, entries, meta, epoch, algorithm)
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


def digest_of(raw: bytes, algorithm: str = hashing.DEFAULT) -> str:
    """The digest of a manifest's exact bytes as recorded: ``"<algorithm>:<hex>"``."""
    return hashing.format_digest(algorithm, hashing.hex_of(algorithm, raw))


def manifest_digest(fs: fsspec.AbstractFileSystem, step_dir: str) -> str:
    """digest_of the manifest file's exact bytes: what the controller records at commit."""
    return digest_of(read_manifest_bytes(fs, step_dir))


def check_digest(dir_path: str, raw: bytes, expected: str) -> None:
    """CheckpointInvalid unless ``raw`` is the manifest whose digest was recorded.

    ``expected``: as digest_of spells it, or a bare sha256 hex (recorded by earlier versions);
    each is checked with its own algorithm. ValueError if it is neither (hashing.parse_digest).
    """
    algorithm, want = hashing.parse_digest(expected)
    got = hashing.hex_of(algorithm, raw)
    if got != want:
        raise CheckpointInvalid(
            dir_path,
            MANIFEST_NAME,
            f"has {algorithm} {got[:12]}..., which does not match the digest recorded when it "
            f"was committed ({want[:12]}...)",
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
    version = doc.get("version")
    if version == _V1:
        if "algorithm" in doc:
            raise bad("is version 1 but names an algorithm")
        algorithm = hashing.SHA256
    elif version == MANIFEST_VERSION:
        algorithm = doc.get("algorithm")
        if algorithm not in hashing.ALGORITHMS:
            raise bad(f"has unsupported hash algorithm {algorithm!r}")
    else:
        raise bad(f"has unsupported version {version!r}")
    files = doc.get("files")
    if not isinstance(files, list):
        raise bad("has no 'files' list")
    for item in files:
        ok = (
            isinstance(item, dict)
            and isinstance(item.get("path"), str)
            and isinstance(item.get("size"), int)
            and not isinstance(item.get("size"), bool)
            and isinstance(item.get(algorithm), str)
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
    doc["algorithm"] = algorithm  # version 1 too: every caller reads item[doc["algorithm"]]
    return doc


def parse_manifest(dir_path: str, raw: bytes) -> dict[str, Any]:
    """The manifest in ``raw``, checked for shape only (not against any file); its
    ``"algorithm"`` is always set (sha256 for version 1)."""
    return _parse(dir_path, raw)


def entries(doc: dict[str, Any]) -> list[FileEntry]:
    """The files a parsed manifest lists, each with its size, hash and the manifest's algorithm."""
    algorithm = doc["algorithm"]
    return [FileEntry(f["path"], f["size"], f[algorithm], algorithm) for f in doc["files"]]


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
    algorithm = doc["algorithm"]

    for item in doc["files"]:
        rel, want_size, want_hash = item["path"], item["size"], item[algorithm]
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
            got = hash_file(fs, full, rel, algorithm)
            if got.size != want_size:
                # The file changed between info() and the read; still not loadable.
                raise CheckpointInvalid(
                    dir_path, rel, f"has {got.size} bytes, manifest says {want_size}"
                )
            if got.hexdigest != want_hash:
                raise CheckpointInvalid(
                    dir_path, rel, f"has {algorithm} {got.hexdigest}, manifest says {want_hash}"
                )
    return doc
