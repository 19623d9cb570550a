"""Migration copy throughput: copy_checkpoint (streamed, hashed, verified) against a plain copy.

    python bench/migration_copy.py                 # 3 shards x 96 MiB, 7 reps of each
    python bench/migration_copy.py --shards 4 --shard-mib 96 --reps 9 --serial

Builds one committed checkpoint on local disk under a fresh temp dir (TMPDIR is pointed inside
it): ``--shards`` shard files of random bytes in a nested layout like a DCP save, plus small
metadata files, hashed and committed through the catalog. Then, rotating the order each rep,
it copies that step to a new local root on the same disk with

  copy:   orchestrator.checkpoint.transfer.copy_checkpoint: chunks read, sha256 computed on a
          second thread while the chunk is written, checked against the manifest, manifest
          last, committed;
  plain:  orchestrator.checkpoint.transfer.plain_copy: the filesystem's own cp_file, i.e.
          shutil.copyfile (sendfile, in the kernel) on local disk; no hashing, not committed;
  serial: (with --serial) copy_checkpoint with the hash computed inline on the copying thread
          instead, i.e. without the overlap, to show what the hash thread buys.

Before every timed copy the previous target is deleted and ``os.sync()`` flushes dirty pages.
The source stays in the page cache after the first read, so the headline times the copy path
with no disk wait: the worst case for hashing, whose CPU cost then has nothing to hide behind.
A second figure adds the ``os.sync()`` right after each copy (until its bytes are on disk).
It also prints what sha256 alone runs at on this CPU (one thread), an upper bound for any
single-stream verified copy. Headline: median MB/s and the ratio copy/plain (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `bench.` and `orchestrator.` importable
    sys.path.insert(0, str(REPO))

from bench.machine import CpuWatch, describe  # noqa: E402
from orchestrator.checkpoint import catalog, manifest, storage, transfer  # noqa: E402
from orchestrator.checkpoint.manifest import CheckpointInvalid  # noqa: E402
from orchestrator.checkpoint.transfer import copy_checkpoint, plain_copy  # noqa: E402

MB = 1e6
MIB = 1 << 20
STEP = 1200


def build_checkpoint(root: str, shards: int, shard_mib: int) -> int:
    """A committed checkpoint laid out like a DCP save; returns its size in bytes."""
    fs, root = storage.open_root(root)
    tmp = catalog.tmp_dir(root, STEP)
    files: dict[str, bytes | None] = {f"model/__{r}_0.distcp": None for r in range(shards)}
    files[".metadata"] = os.urandom(64 << 10)
    files["trainer_state.json"] = b'{"step": %d, "tokens_seen": 1}' % STEP
    files["rng/rank_0.pt"] = os.urandom(4 << 10)
    total = 0
    for rel, data in files.items():
        path = storage.join(tmp, rel)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "wb") as f:
            if data is None:  # a shard: written in pieces, never held whole
                for _ in range(shard_mib):
                    f.write(os.urandom(MIB))
                total += shard_mib * MIB
            else:
                f.write(data)
                total += len(data)
    manifest.build_manifest(fs, tmp, meta={"step": STEP})
    catalog.commit(fs, tmp, catalog.step_dir(root, STEP), check_hashes=False)
    return total


def _serial_copy_file(fs_src, src, fs_dst, dst, entry, src_dir, chunk_bytes, advance, hasher):
    """transfer._copy_file without the hash thread: read, hash, write, one after the other."""
    digest, size = hashlib.sha256(), 0
    with fs_src.open(src, "rb") as fin, fs_dst.open(dst, "wb") as fout:
        while chunk := fin.read(chunk_bytes):
            size += len(chunk)
            digest.update(chunk)
            fout.write(chunk)
            advance(len(chunk))
    if size != entry["size"] or digest.hexdigest() != entry["sha256"]:
        raise CheckpointInvalid(src_dir, entry["path"], "does not match")


def sha256_alone(root: str, chunk_bytes: int) -> float:
    """Seconds to read (page cache) and hash every file of the step, one thread, no writes."""
    fs, root = storage.open_root(root)
    paths = [p for p in fs.find(catalog.step_dir(root, STEP))]
    began = time.perf_counter()
    for path in paths:
        digest = hashlib.sha256()
        with fs.open(path, "rb") as f:
            while chunk := f.read(chunk_bytes):
                digest.update(chunk)
    return time.perf_counter() - began


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
    chunk = a.chunk_mib * MIB

    tmp = Path(tempfile.mkdtemp(prefix="spillway-bench-migration-"))
    (tmp / "tmp").mkdir()
    os.environ["TMPDIR"] = str(tmp / "tmp")
    os.environ["SPILLWAY_HOME"] = str(tmp / "home")
    tempfile.tempdir = None  # re-read TMPDIR
    print(describe())
    kinds = ["copy", "plain"] + (["serial"] if a.serial else [])
    real_copy_file = transfer._copy_file
    try:
        src = str(tmp / "src")
        total = build_checkpoint(src, a.shards, a.shard_mib)
        print(
            f"migration_copy: {a.shards} shards x {a.shard_mib} MiB + 3 metadata files = "
            f"{total / MIB:.1f} MiB, chunk {a.chunk_mib} MiB, {a.reps} reps (+1 warmup) of "
            f"{', '.join(kinds)}; storage={tmp}"
        )
        watch = CpuWatch()
        times: dict[str, list[float]] = {k: [] for k in kinds}
        synced: dict[str, list[float]] = {k: [] for k in kinds}
        for rep in range(a.reps + 1):  # rep 0 warms the page cache and imports
            order = kinds[rep % len(kinds) :] + kinds[: rep % len(kinds)]
            for kind in order:
                dst = tmp / f"dst-{kind}"
                shutil.rmtree(dst, ignore_errors=True)
                os.sync()
                if kind == "plain":
                    seconds = plain_copy(src, str(dst), STEP)
                else:
                    transfer._copy_file = real_copy_file if kind == "copy" else _serial_copy_file
                    try:
                        res = copy_checkpoint(src, str(dst), STEP, chunk_bytes=chunk)
                    finally:
                        transfer._copy_file = real_copy_file
                    assert (res.bytes, res.step, res.attempts) == (total, STEP, 1), res
                    seconds = res.seconds
                began = time.perf_counter()
                os.sync()
                flush = time.perf_counter() - began
                if rep > 0:
                    times[kind].append(seconds)
                    synced[kind].append(seconds + flush)
        hash_s = statistics.median(sha256_alone(src, chunk) for _ in range(3))
        fs, _ = storage.open_root(str(tmp))
        manifest.verify(fs, catalog.step_dir(str(tmp / "dst-copy"), STEP), check_hashes=True)
        foreign = watch.report()

        def rate(s: float) -> str:
            return f"{total / s / MB:8.0f}"

        for kind in kinds:
            print(f"  {kind:6s} MB/s per rep: {' '.join(rate(s).strip() for s in times[kind])}")
        ratios = [pl / c for c, pl in zip(times["copy"], times["plain"], strict=True)]
        print(f"  per-rep ratio copy/plain: {' '.join(f'{r:.2f}' for r in ratios)}")
        med = {k: statistics.median(v) for k, v in times.items()}
        med_sync = {k: statistics.median(v) for k, v in synced.items()}
        print("medians, MB/s            " + "".join(f"{k:>9s}" for k in kinds))
        print("  copy (page cache)      " + "".join(f"{rate(med[k]):>9s}" for k in kinds))
        print("  copy + os.sync()       " + "".join(f"{rate(med_sync[k]):>9s}" for k in kinds))
        print(f"sha256 alone, one thread, page cache: {rate(hash_s).strip()} MB/s")
        print(f"ratio copy/plain throughput (goal >= 0.9): {med['plain'] / med['copy']:.3f}")
        print(
            f"ratio copy/plain, until on disk (+sync):   {med_sync['plain'] / med_sync['copy']:.3f}"
        )
        if a.serial:
            print(f"hash thread speed-up, copy/serial:         {med['serial'] / med['copy']:.3f}")
        print(foreign)
    finally:
        transfer._copy_file = real_copy_file
        if a.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total wall {time.perf_counter() - t0:.1f} s")
