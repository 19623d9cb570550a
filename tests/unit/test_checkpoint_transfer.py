"""Checkpoint copy between storage roots (migration): local and memory://, in both directions."""

from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Iterator

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from orchestrator.checkpoint import catalog, manifest, storage, transfer
from orchestrator.checkpoint.manifest import MANIFEST_NAME, CheckpointInvalid
from orchestrator.checkpoint.transfer import CopyResult, copy_checkpoint

FILES = {
    "model/__0_0.distcp": 5000,
    "model/__1_0.distcp": 3001,
    "model/nested/deeper/extra.bin": 17,
    ".metadata": 300,
    "empty.bin": 0,
}


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch):
    monkeypatch.setattr(transfer, "RETRY_BACKOFF_S", 0.0)


class _Roots:
    """Hands out unique roots and removes the memory:// ones afterwards."""

    def __init__(self, tmp_path) -> None:
        self._tmp = tmp_path
        self._memory: list[str] = []

    def make(self, kind: str) -> str:
        name = f"spillway-xfer-{uuid.uuid4().hex}"
        if kind == "local":
            return str(self._tmp / name)
        url = f"{kind}://{name}"
        self._memory.append(url)
        return url

    def cleanup(self) -> None:
        for url in self._memory:
            fs, root = storage.open_root(url)
            storage.remove_tree(fs, root)


@pytest.fixture
def roots(tmp_path) -> Iterator[_Roots]:
    r = _Roots(tmp_path)
    yield r
    r.cleanup()


@pytest.fixture(params=[("local", "local"), ("local", "memory"), ("memory", "local")])
def pair(request, roots) -> tuple[str, str]:
    return roots.make(request.param[0]), roots.make(request.param[1])


def _save(url: str, step: int, sizes: dict[str, int] | None = None) -> dict[str, bytes]:
    """Commit a checkpoint of random files through the real protocol; returns its contents."""
    fs, root = storage.open_root(url)
    files = {rel: os.urandom(n) for rel, n in (sizes or FILES).items()}
    tmp = catalog.tmp_dir(root, step)
    for rel, data in files.items():
        path = storage.join(tmp, rel)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(data)
    manifest.build_manifest(fs, tmp, meta={"step": step})
    catalog.commit(fs, tmp, catalog.step_dir(root, step))
    return files


def _read(url: str, step: int, rel: str) -> bytes:
    fs, root = storage.open_root(url)
    with fs.open(storage.join(catalog.step_dir(root, step), rel), "rb") as f:
        return f.read()


def _overwrite(url: str, step: int, rel: str, data: bytes) -> None:
    fs, root = storage.open_root(url)
    with fs.open(storage.join(catalog.step_dir(root, step), rel), "wb") as f:
        f.write(data)


def _flip_byte(url: str, step: int, rel: str) -> None:
    data = bytearray(_read(url, step, rel))
    data[len(data) // 2] ^= 0xFF
    _overwrite(url, step, rel, bytes(data))


def _dir_names(url: str) -> list[str]:
    fs, root = storage.open_root(url)
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return []
    return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))


def _assert_committed_copy(src: str, dst: str, step: int, files: dict[str, bytes]) -> None:
    fs, root = storage.open_root(dst)
    assert catalog.committed_steps(fs, root) == [step]
    manifest.verify(fs, catalog.step_dir(root, step), check_hashes=True)
    for rel, data in files.items():
        assert _read(dst, step, rel) == data, rel
    assert _read(dst, step, MANIFEST_NAME) == _read(src, step, MANIFEST_NAME)
    assert not [n for n in _dir_names(dst) if n.endswith(".tmp")]


def _assert_nothing_committed(dst: str) -> None:
    fs, root = storage.open_root(dst)
    assert catalog.committed_steps(fs, root) == []
    assert not [n for n in _dir_names(dst) if n.endswith(".tmp")]


def test_round_trip(pair):
    src, dst = pair
    files = _save(src, 12)
    calls: list[tuple[int, int]] = []
    res = copy_checkpoint(src, dst, 12, progress=lambda d, t: calls.append((d, t)))
    total = sum(len(d) for d in files.values())
    assert (res.step, res.files, res.bytes, res.attempts) == (12, len(files), total, 1)
    assert res.seconds > 0 and res.bytes_per_s == pytest.approx(total / res.seconds)
    _assert_committed_copy(src, dst, 12, files)
    assert calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_default_step_is_latest_verified(pair):
    src, dst = pair
    _save(src, 5)
    newest_good = _save(src, 7)
    _save(src, 9)
    _overwrite(src, 9, "model/__0_0.distcp", b"truncated")  # newer, but does not verify
    res = copy_checkpoint(src, dst)
    assert res.step == 7
    _assert_committed_copy(src, dst, 7, newest_good)


def test_no_checkpoint_or_missing_step_is_file_not_found(roots):
    src, dst = roots.make("local"), roots.make("memory")
    with pytest.raises(FileNotFoundError, match="no verified checkpoint"):
        copy_checkpoint(src, dst)
    _save(src, 3)
    with pytest.raises(FileNotFoundError, match="step 4"):
        copy_checkpoint(src, dst, 4)
    _assert_nothing_committed(dst)


def test_second_call_is_idempotent(pair, monkeypatch):
    src, dst = pair
    files = _save(src, 8)
    assert copy_checkpoint(src, dst, 8).bytes > 0

    def must_not_copy(*a, **k):
        raise AssertionError("copied again")

    monkeypatch.setattr(transfer, "_copy_once", must_not_copy)
    calls: list[tuple[int, int]] = []
    res = copy_checkpoint(src, dst, 8, progress=lambda d, t: calls.append((d, t)))
    total = sum(len(d) for d in files.values())
    assert (res.step, res.files, res.bytes, res.attempts) == (8, len(files), 0, 0)
    assert calls == [(total, total)]
    _assert_committed_copy(src, dst, 8, files)


def test_invalid_target_step_is_replaced(pair):
    src, dst = pair
    files = _save(src, 4)
    copy_checkpoint(src, dst, 4)
    _flip_byte(dst, 4, "model/__1_0.distcp")  # same size: only a full hash catches it
    res = copy_checkpoint(src, dst, 4)
    assert res.bytes == sum(len(d) for d in files.values()) and res.attempts == 1
    _assert_committed_copy(src, dst, 4, files)


def test_different_verified_target_step_is_refused(pair):
    src, dst = pair
    _save(src, 6)
    theirs = _save(dst, 6)
    with pytest.raises(FileExistsError, match="different files"):
        copy_checkpoint(src, dst, 6)
    assert _read(dst, 6, "model/__0_0.distcp") == theirs["model/__0_0.distcp"]


def test_corrupt_source_fails_after_retries_and_commits_nothing(pair, monkeypatch):
    src, dst = pair
    _save(src, 3)
    _flip_byte(src, 3, "model/__1_0.distcp")  # same size: sizes-only checks pass
    attempts = []
    real = transfer._copy_once
    monkeypatch.setattr(
        transfer, "_copy_once", lambda *a, **k: (attempts.append(1), real(*a, **k))[1]
    )
    with pytest.raises(CheckpointInvalid) as err:
        copy_checkpoint(src, dst, 3, retries=2)
    assert err.value.file == "model/__1_0.distcp" and "has blake3" in err.value.reason
    assert len(attempts) == 3
    _assert_nothing_committed(dst)


def test_corrupt_source_with_no_retries_is_one_attempt(pair, monkeypatch):
    src, dst = pair
    _save(src, 3)
    _flip_byte(src, 3, ".metadata")
    attempts = []
    real = transfer._copy_once
    monkeypatch.setattr(
        transfer, "_copy_once", lambda *a, **k: (attempts.append(1), real(*a, **k))[1]
    )
    with pytest.raises(CheckpointInvalid):
        copy_checkpoint(src, dst, 3, retries=0)
    assert len(attempts) == 1
    _assert_nothing_committed(dst)


def test_unexpected_error_is_not_retried_and_leaves_no_tmp(pair):
    src, dst = pair
    _save(src, 3)
    calls = []

    def bar(done: int, total: int) -> None:
        calls.append(done)
        raise RuntimeError("terminal went away")

    with pytest.raises(RuntimeError, match="terminal"):
        copy_checkpoint(src, dst, 3, retries=2, progress=bar)
    assert len(calls) == 1
    _assert_nothing_committed(dst)


# --- an instrumented source: fails on demand and records how it is read and written ----------

PROTO = "spillwaytestflaky"


class _Tap:
    """Proxy for an open file that records the size of every read and write."""

    def __init__(self, f, fs: InstrumentedFS) -> None:
        self._f, self._fs = f, fs

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._fs.reads.append(len(data) if n is not None and n >= 0 else None)
        return data

    def write(self, data) -> int:
        self._fs.writes.append(len(data))
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


class InstrumentedFS(MemoryFileSystem):
    """memory:// under a test-only protocol (same shared store) that taps data-file I/O."""

    protocol = PROTO
    fail_opens = 0  # the next N opens of a data file for reading raise OSError
    reads: list[int | None] = []  # None = a read with no size limit
    writes: list[int] = []

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str):
            path = path.removeprefix(f"{PROTO}://")
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", *args, **kwargs):
        f = super()._open(path, mode, *args, **kwargs)
        if str(path).endswith(MANIFEST_NAME):
            return f
        if "r" in mode and InstrumentedFS.fail_opens > 0:
            InstrumentedFS.fail_opens -= 1
            raise OSError(f"transient: connection reset reading {path}")
        return _Tap(f, self)


@pytest.fixture
def tapped(roots) -> Iterator[type[InstrumentedFS]]:
    fsspec.register_implementation(PROTO, InstrumentedFS, clobber=True)
    InstrumentedFS.fail_opens = 0
    InstrumentedFS.reads, InstrumentedFS.writes = [], []
    yield InstrumentedFS
    InstrumentedFS.fail_opens = 0


def test_transient_read_error_is_retried(tapped, roots):
    src, dst = roots.make(PROTO), roots.make("local")
    files = _save(src, 2)
    tapped.fail_opens = 1
    res = copy_checkpoint(src, dst, 2, retries=2)
    assert res.attempts == 2 and res.bytes == sum(len(d) for d in files.values())
    _assert_committed_copy(src, dst, 2, files)


def test_persistent_read_error_propagates_and_commits_nothing(tapped, roots):
    src, dst = roots.make(PROTO), roots.make("memory")
    _save(src, 2)
    tapped.fail_opens = 100
    with pytest.raises(OSError, match="transient"):
        copy_checkpoint(src, dst, 2, retries=1)
    assert tapped.fail_opens == 98  # two attempts, one failed open each
    _assert_nothing_committed(dst)


def test_files_larger_than_a_chunk_are_streamed(tapped, roots):
    src, dst = roots.make(PROTO), roots.make(PROTO)
    chunk = 1000
    files = _save(src, 1, {"model/__0_0.distcp": 7 * chunk + 123, "model/__1_0.distcp": 2500})
    tapped.reads, tapped.writes = [], []
    calls: list[tuple[int, int]] = []
    res = copy_checkpoint(
        src, dst, 1, chunk_bytes=chunk, progress=lambda d, t: calls.append((d, t))
    )
    total = 7 * chunk + 123 + 2500
    assert res.bytes == total
    assert None not in tapped.reads, "a data file was read whole"
    assert max(tapped.reads) == chunk and max(tapped.writes) == chunk
    assert sum(tapped.writes) == total
    assert len(tapped.writes) >= 8 + 3
    # one progress call per chunk, ending at (total, total)
    assert len(calls) == len(tapped.writes) and calls[-1] == (total, total)
    assert all(t == total for _, t in calls)
    _assert_committed_copy(src, dst, 1, files)


def test_rate_limit_holds_the_copy_to_the_cap(roots):
    src, dst = roots.make("local"), roots.make("local")
    files = _save(src, 3, {"a.bin": 40_000, "b.bin": 20_000})
    res = copy_checkpoint(src, dst, 3, limit_bytes_per_s=200_000)
    # 60 kB at 200 kB/s cannot take less than 0.3 s, whatever the machine.
    assert res.seconds >= 0.3 and res.bytes == 60_000
    _assert_committed_copy(src, dst, 3, files)
    with pytest.raises(ValueError, match="limit_bytes_per_s"):
        copy_checkpoint(src, dst, 3, limit_bytes_per_s=0)


def test_copy_result_rate():
    assert CopyResult(1, 2, 1000, 2.0, 1).bytes_per_s == 500.0
    assert CopyResult(1, 2, 0, 0.0, 0).bytes_per_s == 0.0


def test_bad_arguments(roots):
    with pytest.raises(ValueError):
        copy_checkpoint(roots.make("local"), roots.make("local"), 1, retries=-1)
    with pytest.raises(ValueError):
        copy_checkpoint(roots.make("local"), roots.make("local"), 1, chunk_bytes=0)
    with pytest.raises(ValueError, match="needs the step"):
        copy_checkpoint(roots.make("local"), roots.make("local"), expected_manifest_digest="ab")


# --- the manifest's digest, recorded when the step was committed -----------------------------


def _digest(url: str, step: int) -> str:
    fs, root = storage.open_root(url)
    return manifest.manifest_digest(fs, catalog.step_dir(root, step))


def _forge(url: str, step: int, rel: str, data: bytes) -> None:
    """What a hostile partner can do: new bytes, and a manifest rewritten to match them."""
    _overwrite(url, step, rel, data)
    fs, root = storage.open_root(url)
    manifest.build_manifest(fs, catalog.step_dir(root, step), meta={"step": step})


def test_copy_with_the_recorded_digest(pair):
    src, dst = pair
    files = _save(src, 6)
    recorded = _digest(src, 6)
    res = copy_checkpoint(src, dst, 6, expected_manifest_digest=recorded)
    assert res.attempts == 1
    _assert_committed_copy(src, dst, 6, files)
    assert _digest(dst, 6) == recorded  # the target holds the very bytes that were recorded
    again = copy_checkpoint(src, dst, 6, expected_manifest_digest=recorded)
    assert (again.bytes, again.attempts) == (0, 0)


def test_a_forged_checkpoint_is_refused_before_any_file_is_read(tapped, roots):
    src, dst = roots.make(PROTO), roots.make("local")
    _save(src, 6)
    recorded = _digest(src, 6)
    _forge(src, 6, "model/__0_0.distcp", b"weights of the partner's choosing")
    forged = _digest(src, 6)
    tapped.reads = []
    with pytest.raises(CheckpointInvalid) as refused:
        copy_checkpoint(src, dst, 6, retries=2, expected_manifest_digest=recorded)
    forged_hex, recorded_hex = forged.removeprefix("blake3:"), recorded.removeprefix("blake3:")
    assert str(refused.value) == (
        f"step-000000006: MANIFEST.json has blake3 {forged_hex[:12]}..., which does not match "
        f"the digest recorded when it was committed ({recorded_hex[:12]}...)"
    )
    assert tapped.reads == [], "a data file was read after the manifest was refused"
    _assert_nothing_committed(dst)
    assert _dir_names(dst) == []  # nothing staged either


TWO_FACED = "spillwaytesttwofaced"


class TwoFacedFS(MemoryFileSystem):
    """memory:// under a test-only protocol whose manifest reads after the first return a forged
    manifest: a store that answers a second read differently from the first."""

    protocol = TWO_FACED
    manifest_reads = 0
    forged: bytes | None = None

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str):
            path = path.removeprefix(f"{TWO_FACED}://")
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", *args, **kwargs):
        if "r" in mode and str(path).endswith(MANIFEST_NAME):
            TwoFacedFS.manifest_reads += 1
            if TwoFacedFS.manifest_reads > 1 and TwoFacedFS.forged is not None:
                return io.BytesIO(TwoFacedFS.forged)
        return super()._open(path, mode, *args, **kwargs)


@pytest.fixture
def two_faced(roots) -> Iterator[type[TwoFacedFS]]:
    fsspec.register_implementation(TWO_FACED, TwoFacedFS, clobber=True)
    yield TwoFacedFS
    TwoFacedFS.manifest_reads, TwoFacedFS.forged = 0, None


def test_the_source_manifest_is_read_once_and_those_bytes_are_copied(two_faced, roots):
    src, dst = roots.make(TWO_FACED), roots.make("local")
    files = _save(src, 6)
    recorded = _digest(src, 6)
    honest = _read(src, 6, MANIFEST_NAME)
    forged = json.loads(honest)
    forged["files"] = [f for f in forged["files"] if f["path"] != "empty.bin"]
    two_faced.forged = json.dumps(forged).encode()
    two_faced.manifest_reads = 0
    copy_checkpoint(src, dst, 6, expected_manifest_digest=recorded)
    assert two_faced.manifest_reads == 1
    fs, root = storage.open_root(dst)
    with fs.open(storage.join(catalog.step_dir(root, 6), MANIFEST_NAME), "rb") as f:
        assert f.read() == honest
    two_faced.forged = None
    _assert_committed_copy(src, dst, 6, files)
