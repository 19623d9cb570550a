"""Migration copy throughput: copy_checkpoint (streamed, hashed, verified) against a plain copy.

    python bench/migration_copy.py                 # 3 shards x 96 MiB on disk, 7 reps of each
    python bench/migration_copy.py --shards 4 --shard-mib 96 --reps 9 --serial
    python bench/migration_copy.py --source s3     # from a bucket (moto on 127.0.0.1) to disk

Builds one committed checkpoint under a fresh temp dir (TMPDIR is pointed inside it):
``--shards`` shard files of random bytes in a nested layout like a DCP save, plus small
metadata files, hashed and committed through the catalog. With ``--source disk`` (default) it is
on local disk (written to step-N.tmp/, renamed); with ``--source s3`` it is in a bucket of an S3
server the benchmark starts itself on 127.0.0.1 (moto's server mode, as `spillway fleet up`
starts it for the partner; its own process and session, stopped by its PIDs at the end), written
in place under step-N/ with the manifest last, as a partner's save commits. Then, rotating the
order each rep, it copies that step to a new root on local disk with

  copy:   orchestrator.checkpoint.transfer.copy_checkpoint: BLAKE3 (the manifest's algorithm)
          computed on a second thread while the chunk is written (disk to disk: copied in the
          kernel, and what landed read back and hashed), checked against the manifest,
          manifest last, committed;
  plain:  common.plain_copy (bench/common.py) of the same files: the filesystem's own
          copy (shutil.copyfile, i.e. sendfile in the kernel, disk to disk; s3fs get_file,
          bucket to disk); no hashing, not committed;
  serial: (with --serial) copy_checkpoint with the hash computed inline on the copying thread
          instead, streamed, i.e. without the overlap or the kernel copy.

Before every timed copy the previous target is deleted and ``os.sync()`` flushes dirty pages.
A disk source stays in the page cache after the first read, so that headline times the copy
path with no disk wait: the worst case for hashing, whose CPU cost then has nothing to hide
behind. A second figure adds the ``os.sync()`` right after each copy (until its bytes are on
disk). It also prints what sha256 alone runs at on this CPU (one thread, a local copy from the
page cache), an upper bound for any single-stream verified copy. Headline: median MB/s and the
ratio copy/plain (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import common  # bench/common.py (this directory is on sys.path; it puts the repo there too)
from common import median
from machine import CpuWatch, describe, usable_cores

from orchestrator.checkpoint import catalog, hashing, manifest, storage, transfer
from orchestrator.checkpoint.manifest import CheckpointInvalid
from orchestrator.checkpoint.transfer import copy_checkpoint

MB = 1e6
MIB = 1 << 20
STEP = 1200
BUCKET = "spillway-bench"


def build_checkpoint(root: str, shards: int, shard_mib: int, options: dict[str, Any]) -> int:
    """A committed checkpoint laid out like a DCP save, committed as a save on that store
    commits it; returns its size in bytes."""
    fs, root = storage.open_root(root, options)
    staging = catalog.prepare_staging(fs, root, STEP)
    files: dict[str, bytes | None] = {f"model/__{r}_0.distcp": None for r in range(shards)}
    files[".metadata"] = os.urandom(64 << 10)
    files["trainer_state.json"] = b'{"step": %d, "tokens_seen": 1}' % STEP
    files["rng/rank_0.pt"] = os.urandom(4 << 10)
    total = 0
    for rel, data in files.items():
        path = storage.join(staging, rel)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "wb") as f:
            if data is None:  # a shard: written in pieces, never held whole
                for _ in range(shard_mib):
                    f.write(os.urandom(MIB))
                total += shard_mib * MIB
            else:
                f.write(data)
                total += len(data)
    manifest.build_manifest(fs, staging, meta={"step": STEP})
    catalog.commit(fs, staging, catalog.step_dir(root, STEP), check_hashes=False)
    return total


def _serial_copy_file(fs_src, src, fs_dst, dst, entry, src_dir, chunk_bytes, advance, hasher):
    """transfer._copy_file without the hash thread or the kernel copy: read, hash (the entry's
    algorithm, on this thread alone), write, one after the other."""
    digest, size = hashing.new_hasher(entry.algorithm, 1), 0
    with fs_src.open(src, "rb") as fin, fs_dst.open(dst, "wb") as fout:
        while chunk := fin.read(chunk_bytes):
            size += len(chunk)
            digest.update(chunk)
            fout.write(chunk)
            advance(len(chunk))
    if size != entry.size or digest.hexdigest() != entry.hexdigest:
        raise CheckpointInvalid(src_dir, entry.path, "does not match")


def sha256_alone(root: str, chunk_bytes: int) -> float:
    """Seconds to read (page cache) and hash every file of a local step, one thread, no writes."""
    fs, root = storage.open_root(root)
    paths = list(fs.find(catalog.step_dir(root, STEP)))
    began = time.perf_counter()
    for path in paths:
        digest = hashlib.sha256()
        with fs.open(path, "rb") as f:
            while chunk := f.read(chunk_bytes):
                digest.update(chunk)
    return time.perf_counter() - began


@contextlib.contextmanager
def source(kind: str, tmp: Path) -> Iterator[tuple[str, dict[str, Any], list[int]]]:
    """(url, storage options, sessions of the server) of the source root: a local dir, or a
    bucket on an S3 server started here for this run and stopped at its end."""
    if kind == "disk":
        yield str(tmp / "src"), {}, []
        return
    with common.local_s3(tmp, BUCKET) as server:
        print(f"S3 source: a moto server at {server.endpoint} (pid {server.session_id}), {BUCKET}")
        yield f"s3://{BUCKET}/src", server.storage_options(), [server.session_id]


def measure(a: argparse.Namespace, tmp: Path) -> None:
    chunk = a.chunk_mib * MIB
    kinds = ["copy", "plain"] + (["serial"] if a.serial else [])
    real_copy_file = transfer._copy_file
    with source(a.source, tmp) as (src, options, server_sessions):
        total = build_checkpoint(src, a.shards, a.shard_mib, options)
        print(
            f"migration_copy: {a.source} -> disk, {a.shards} shards x {a.shard_mib} MiB + 3 "
            f"metadata files = {total / MIB:.1f} MiB, chunk {a.chunk_mib} MiB, {a.reps} reps "
            f"(+1 warmup) of {', '.join(kinds)}; source {src}, targets under {tmp}"
        )
        watch, server_cpu = CpuWatch(), common.SessionCpu(server_sessions)
        times: dict[str, list[float]] = {k: [] for k in kinds}
        synced: dict[str, list[float]] = {k: [] for k in kinds}
        for rep in range(a.reps + 1):  # rep 0 warms the page cache, connections and imports
            order = kinds[rep % len(kinds) :] + kinds[: rep % len(kinds)]
            for kind in order:
                dst = tmp / f"dst-{kind}"
                shutil.rmtree(dst, ignore_errors=True)
                os.sync()
                if kind == "plain":
                    seconds = common.plain_copy(src, str(dst), STEP, src_options=options)
                else:
                    transfer._copy_file = real_copy_file if kind == "copy" else _serial_copy_file
                    try:
                        res = copy_checkpoint(
                            src, str(dst), STEP, chunk_bytes=chunk, src_options=options
                        )
                    finally:
                        transfer._copy_file = real_copy_file
                    if (res.bytes, res.step, res.attempts) != (total, STEP, 1):
                        raise common.BenchError(f"{kind}: copied {res}, not {total} bytes once")
                    seconds = res.seconds
                began = time.perf_counter()
                os.sync()
                flush = time.perf_counter() - began
                if rep > 0:
                    times[kind].append(seconds)
                    synced[kind].append(seconds + flush)
        foreign, server_s = watch.foreign(), server_cpu.total_s()
        foreign_line = watch.report()
    local_copy = str(tmp / "dst-copy")
    fs, _ = storage.open_root(local_copy)
    manifest.verify(fs, catalog.step_dir(local_copy, STEP), check_hashes=True)
    hash_s = median(sha256_alone(local_copy, chunk) for _ in range(3))

    def rate(s: float) -> str:
        return f"{total / s / MB:8.0f}"

    for kind in kinds:
        print(f"  {kind:6s} MB/s per rep: {' '.join(rate(s).strip() for s in times[kind])}")
    ratios = [pl / c for c, pl in zip(times["copy"], times["plain"], strict=True)]
    print(f"  per-rep ratio copy/plain: {common.listing(ratios)}")
    med = {k: median(v) for k, v in times.items()}
    med_sync = {k: median(v) for k, v in synced.items()}
    print("medians, MB/s            " + "".join(f"{k:>9s}" for k in kinds))
    print("  copy                   " + "".join(f"{rate(med[k]):>9s}" for k in kinds))
    print("  copy + os.sync()       " + "".join(f"{rate(med_sync[k]):>9s}" for k in kinds))
    print(f"sha256 alone, one thread, page cache: {rate(hash_s).strip()} MB/s")
    print(
        f"ratio copy/plain throughput, {a.source} -> disk (goal >= 0.9): "
        f"{med['plain'] / med['copy']:.3f}"
    )
    print(f"ratio copy/plain, until on disk (+sync): {med_sync['plain'] / med_sync['copy']:.3f}")
    if a.serial:
        print(f"hash thread speed-up, copy/serial:       {med['serial'] / med['copy']:.3f}")
    print(foreign_line)
    if server_sessions and foreign is not None:
        other, wall, _ = foreign
        cores = usable_cores() or 1
        print(
            f"  of which the S3 server (this benchmark's): {server_s:.1f} cpu-s "
            f"({server_s / wall / cores:.0%}); other processes without it: "
            f"{max(0.0, other - server_s) / wall / cores:.0%}"
        )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--source", choices=("disk", "s3"), default="disk", help="where the checkpoint is"
    )
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--shard-mib", type=int, default=96)
    p.add_argument("--reps", type=int, default=7, help="timed copies of each kind")
    p.add_argument("--chunk-mib", type=int, default=8, help="copy_checkpoint chunk_bytes")
    p.add_argument("--serial", action="store_true", help="also time the hash-inline variant")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    a = p.parse_args()
    if min(a.reps, a.shards, a.shard_mib, a.chunk_mib) < 1:
        p.error("--reps, --shards, --shard-mib and --chunk-mib must be >= 1")
    print(describe())
    began = time.perf_counter()
    with common.state_dir("spillway-bench-migration-", a.keep) as tmp:
        os.environ["TMPDIR"] = str(tmp / "tmp")
        os.environ["SPILLWAY_HOME"] = str(tmp / "home")
        tempfile.tempdir = None  # re-read TMPDIR
        measure(a, tmp)
    print(f"total wall {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    common.run_main(main)
