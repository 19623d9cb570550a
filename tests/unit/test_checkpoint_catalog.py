"""Commit protocol, manifest verification and catalog, on local disk and memory://."""

from __future__ import annotations

import hashlib
import json
import pickle
import uuid
from collections.abc import Iterator

import blake3
import fsspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.checkpoint import catalog, manifest, storage
from orchestrator.checkpoint.manifest import MANIFEST_NAME, CheckpointInvalid, FileEntry


def _memory_root() -> tuple[fsspec.AbstractFileSystem, str]:
    # The memory filesystem is a process-wide singleton; a unique root keeps tests apart.
    # Top-level root so remove_tree leaves no pseudo-directory behind either.
    return storage.open_root(f"memory://spillway-test-{uuid.uuid4().hex}")


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path) -> Iterator[tuple[fsspec.AbstractFileSystem, str]]:
    if request.param == "local":
        yield storage.open_root(str(tmp_path / "ckpt"))
        return
    fs, root = _memory_root()
    try:
        yield fs, root
    finally:
        storage.remove_tree(fs, root)


def _write(fs, path: str, data: bytes) -> None:
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def _save(fs, root: str, step: int, files: dict[str, bytes] | None = None) -> str:
    """Run the full protocol for one step and return the committed path."""
    files = files or {"__0_0.distcp": f"weights-{step}".encode() * 10, ".metadata": b"meta"}
    tmp = catalog.tmp_dir(root, step)
    for rel, data in files.items():
        _write(fs, storage.join(tmp, rel), data)
    manifest.build_manifest(fs, tmp, meta={"step": step})
    final = catalog.step_dir(root, step)
    catalog.commit(fs, tmp, final)
    return final


def test_open_root_plain_path_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, root = storage.open_root("rel/dir/")
    assert fs.protocol[0] in ("file", "local")
    assert root == str(tmp_path / "rel" / "dir")


def test_join():
    assert storage.join("/a/", "b", "/c/") == "/a/b/c"
    assert storage.join("/", "a") == "/a"
    assert storage.join("bucket/p", "", "x") == "bucket/p/x"


def test_names_and_parse_step():
    assert catalog.step_dir("/r", 8) == "/r/step-000000008"
    assert catalog.tmp_dir("/r", 8) == "/r/step-000000008.tmp"
    assert catalog.parse_step("step-000000042") == 42
    for bad in ("step-000000042.tmp", "step-42", "step-0000000042", "xstep-000000042", ""):
        assert catalog.parse_step(bad) is None
    with pytest.raises(ValueError):
        catalog.step_dir("/r", 10**9)


def test_round_trip(store):
    fs, root = store
    final = _save(fs, root, 5, {"__0_0.distcp": b"abc" * 1000, "sub/deep/x.bin": b"nested"})
    doc = manifest.verify(fs, final)
    assert (doc["version"], doc["algorithm"]) == (2, "blake3")
    assert doc["meta"] == {"step": 5}
    by_path = {f["path"]: f for f in doc["files"]}
    assert set(by_path) == {"__0_0.distcp", "sub/deep/x.bin"}  # nested files included
    assert by_path["sub/deep/x.bin"]["size"] == 6
    assert not fs.exists(catalog.tmp_dir(root, 5))
    assert catalog.committed_steps(fs, root) == [5]
    assert catalog.latest_verified(fs, root) == (5, final)


def test_hash_file_streams_in_chunks(store, monkeypatch):
    fs, root = store
    monkeypatch.setattr(manifest, "_CHUNK", 7)
    data = bytes(range(256)) * 3
    _write(fs, storage.join(root, "f"), data)
    entry = manifest.hash_file(fs, storage.join(root, "f"), "f")
    assert entry == FileEntry("f", len(data), blake3.blake3(data).hexdigest(), "blake3")
    old = manifest.hash_file(fs, storage.join(root, "f"), "f", "sha256")
    assert old == FileEntry("f", len(data), hashlib.sha256(data).hexdigest(), "sha256")


def test_truncated_file_names_the_file(store):
    fs, root = store
    final = _save(fs, root, 8, {"__0_0.distcp": b"x" * 5678})
    _write(fs, storage.join(final, "__0_0.distcp"), b"x" * 1234)
    with pytest.raises(CheckpointInvalid) as ei:
        manifest.verify(fs, final, check_hashes=False)
    assert ei.value.file == "__0_0.distcp"
    assert str(ei.value) == "step-000000008: __0_0.distcp has 1234 bytes, manifest says 5678"


def test_flipped_byte_same_size_detected_by_hash(store):
    fs, root = store
    final = _save(fs, root, 3, {"__0_0.distcp": b"\x00" * 100})
    _write(fs, storage.join(final, "__0_0.distcp"), b"\x00" * 50 + b"\x01" + b"\x00" * 49)
    manifest.verify(fs, final, check_hashes=False)  # sizes alone cannot see it
    with pytest.raises(CheckpointInvalid) as ei:
        manifest.verify(fs, final)
    assert ei.value.file == "__0_0.distcp"
    assert ei.value.reason.startswith("has blake3 ")


def test_missing_and_unparsable_manifest(store):
    fs, root = store
    final = _save(fs, root, 1)
    _write(fs, storage.join(final, MANIFEST_NAME), b"{not json")
    with pytest.raises(CheckpointInvalid) as ei:
        manifest.verify(fs, final)
    assert ei.value.file == MANIFEST_NAME
    fs.rm(storage.join(final, MANIFEST_NAME))
    with pytest.raises(CheckpointInvalid) as ei:
        manifest.verify(fs, final)
    assert (ei.value.file, ei.value.reason) == (MANIFEST_NAME, "is missing")


def test_missing_listed_file(store):
    fs, root = store
    final = _save(fs, root, 2, {"a": b"1", "b": b"2"})
    fs.rm(storage.join(final, "b"))
    with pytest.raises(CheckpointInvalid) as ei:
        manifest.verify(fs, final)
    assert (ei.value.file, ei.value.reason) == ("b", "is missing")


def test_unsafe_manifest_path_rejected(store):
    fs, root = store
    final = _save(fs, root, 2)
    doc = json.loads(fs.cat(storage.join(final, MANIFEST_NAME)))
    doc["files"].append({"path": "../outside", "size": 0, "blake3": ""})
    _write(fs, storage.join(final, MANIFEST_NAME), json.dumps(doc).encode())
    with pytest.raises(CheckpointInvalid, match="unsafe path"):
        manifest.verify(fs, final)


def test_missing_manifest_falls_back_with_warning(store):
    fs, root = store
    _save(fs, root, 4)
    newest = _save(fs, root, 8)
    fs.rm(storage.join(newest, MANIFEST_NAME))
    warnings: list[str] = []
    assert catalog.latest_verified(fs, root, warn=warnings.append) == (
        4,
        catalog.step_dir(root, 4),
    )
    if not catalog.renames_atomically(fs):
        # In place on an object store a step dir without its manifest is a save not yet
        # committed: not listed at all, so nothing to warn about.
        assert warnings == [] and catalog.committed_steps(fs, root) == [4]
        return
    assert len(warnings) == 1
    assert "step-000000008" in warnings[0] and MANIFEST_NAME in warnings[0]
    assert "using an earlier one" in warnings[0]


def test_on_an_object_store_the_manifest_written_last_is_the_commit():
    fs, root = _memory_root()
    try:
        staged = catalog.prepare_staging(fs, root, 5)
        assert staged == catalog.step_dir(root, 5) == catalog.staging_path(fs, root, 5)
        _write(fs, storage.join(staged, "__0_0.distcp"), b"weights" * 10)
        assert catalog.committed_steps(fs, root) == []  # written, not yet committed
        manifest.build_manifest(fs, staged, meta={"step": 5})
        catalog.commit(fs, staged, staged)
        assert catalog.committed_steps(fs, root) == [5]
        assert catalog.latest_verified(fs, root) == (5, staged)
        with pytest.raises(FileExistsError):
            catalog.prepare_staging(fs, root, 5)  # never written over once committed

        debris = catalog.prepare_staging(fs, root, 6)
        _write(fs, storage.join(debris, "__0_0.distcp"), b"half a save")
        assert catalog.remove_stale_tmp(fs, root) == ["step-000000006"]
        assert not fs.exists(debris) and catalog.committed_steps(fs, root) == [5]

        _write(fs, storage.join(catalog.step_dir(root, 7), "__0_0.distcp"), b"x")
        catalog.prepare_staging(fs, root, 7)  # a crashed save's debris goes first
        assert not fs.exists(catalog.step_dir(root, 7))
    finally:
        storage.remove_tree(fs, root)


def test_on_a_local_disk_a_save_is_staged_in_a_tmp_dir(tmp_path):
    fs, root = storage.open_root(str(tmp_path / "ckpt"))
    assert catalog.renames_atomically(fs)
    assert catalog.prepare_staging(fs, root, 3) == catalog.tmp_dir(root, 3)


def test_tmp_dir_never_counts(store):
    fs, root = store
    _save(fs, root, 1)
    tmp = catalog.tmp_dir(root, 9)
    _write(fs, storage.join(tmp, "__0_0.distcp"), b"data")
    manifest.build_manifest(fs, tmp)  # fully valid contents, but never renamed
    assert catalog.committed_steps(fs, root) == [1]
    assert catalog.latest_verified(fs, root)[0] == 1
    assert catalog.remove_stale_tmp(fs, root) == ["step-000000009.tmp"]
    assert not fs.exists(tmp)
    assert catalog.committed_steps(fs, root) == [1]


def test_latest_verified_ignores_listing_order(store, monkeypatch):
    fs, root = store
    for step in (3, 20, 7):
        _save(fs, root, step)
    real_ls = fs.ls

    def shuffled_ls(path, detail=True, **kw):
        # Rotate the sorted listing: step 20 is neither first nor last.
        out = sorted(real_ls(path, detail=detail, **kw), key=lambda e: e["name"])
        return out[1:] + out[:1]

    monkeypatch.setattr(fs, "ls", shuffled_ls)
    assert catalog.committed_steps(fs, root) == [20, 7, 3]
    assert catalog.latest_verified(fs, root) == (20, catalog.step_dir(root, 20))


def test_empty_or_missing_root(store):
    fs, root = store
    assert catalog.committed_steps(fs, root) == []
    assert catalog.latest_verified(fs, root) is None
    assert catalog.remove_stale_tmp(fs, root) == []
    assert catalog.prune(fs, root, keep=1) == []


def test_prune_keeps_newest_valid(store):
    fs, root = store
    for step in (1, 2, 3, 4, 5, 6):
        _save(fs, root, step)
    # Newest is invalid: it stays (newer than the oldest kept) but does not count.
    fs.rm(storage.join(catalog.step_dir(root, 6), "__0_0.distcp"))
    # An invalid one among the older ones is deleted like the rest.
    fs.rm(storage.join(catalog.step_dir(root, 2), MANIFEST_NAME))
    assert catalog.prune(fs, root, keep=2) == [3, 2, 1]
    assert catalog.committed_steps(fs, root) == [6, 5, 4]
    assert catalog.prune(fs, root, keep=2) == []


def test_prune_below_target_deletes_nothing(store):
    fs, root = store
    _save(fs, root, 1)
    _save(fs, root, 2)
    assert catalog.prune(fs, root, keep=3) == []
    assert catalog.committed_steps(fs, root) == [2, 1]


@pytest.mark.parametrize("keep", [0, -1])
def test_prune_rejects_keep_below_one(store, keep):
    fs, root = store
    with pytest.raises(ValueError):
        catalog.prune(fs, root, keep=keep)


def test_commit_refuses_unverifiable_tmp(store):
    fs, root = store
    tmp = catalog.tmp_dir(root, 1)
    _write(fs, storage.join(tmp, "a"), b"data")  # no manifest
    with pytest.raises(CheckpointInvalid):
        catalog.commit(fs, tmp, catalog.step_dir(root, 1))
    manifest.build_manifest(fs, tmp)
    _write(fs, storage.join(tmp, "a"), b"dat")  # truncated after manifest
    with pytest.raises(CheckpointInvalid):
        catalog.commit(fs, tmp, catalog.step_dir(root, 1))
    assert not fs.exists(catalog.step_dir(root, 1))


def test_commit_never_replaces_verified_final(store):
    fs, root = store
    final = _save(fs, root, 1, {"a": b"original"})
    tmp = catalog.tmp_dir(root, 1)
    _write(fs, storage.join(tmp, "a"), b"replacement")
    manifest.build_manifest(fs, tmp)
    with pytest.raises(FileExistsError):
        catalog.commit(fs, tmp, final)
    assert fs.cat(storage.join(final, "a")) == b"original"


def test_commit_replaces_invalid_final(store):
    fs, root = store
    final = catalog.step_dir(root, 1)
    _write(fs, storage.join(final, "debris"), b"half-copied")  # no manifest
    tmp = catalog.tmp_dir(root, 1)
    _write(fs, storage.join(tmp, "a"), b"good")
    manifest.build_manifest(fs, tmp)
    catalog.commit(fs, tmp, final)
    assert manifest.list_files(fs, final) == ["a"]  # not nested, debris gone
    assert catalog.latest_verified(fs, root) == (1, final)


def test_write_manifest_requires_exact_coverage(store):
    fs, root = store
    d = catalog.tmp_dir(root, 1)
    _write(fs, storage.join(d, "a"), b"1")
    _write(fs, storage.join(d, "sub/b"), b"2")
    a = manifest.hash_file(fs, storage.join(d, "a"), "a")
    b = manifest.hash_file(fs, storage.join(d, "sub/b"), "sub/b")
    with pytest.raises(ValueError, match="sub/b"):
        manifest.write_manifest(fs, d, [a])
    with pytest.raises(ValueError, match="ghost"):
        manifest.write_manifest(fs, d, [a, b, FileEntry("ghost", 0, "")])
    with pytest.raises(ValueError, match="more than once"):
        manifest.write_manifest(fs, d, [a, a, b])
    assert not fs.exists(storage.join(d, MANIFEST_NAME))
    manifest.write_manifest(fs, d, [b, a])
    assert manifest.list_files(fs, d) == ["a", "sub/b"]


def test_build_manifest_uses_precomputed(store):
    fs, root = store
    d = catalog.tmp_dir(root, 1)
    _write(fs, storage.join(d, "a"), b"1")
    _write(fs, storage.join(d, "b"), b"2")
    # A deliberately wrong precomputed hash proves it was used rather than recomputed.
    fake = FileEntry("a", 1, "0" * 64)
    entries = manifest.build_manifest(fs, d, precomputed={"a": fake})
    assert fake in entries and len(entries) == 2
    with pytest.raises(CheckpointInvalid, match="a has blake3"):
        manifest.verify(fs, d)
    # A rank that reports a file that never reached storage is a partial checkpoint.
    with pytest.raises(ValueError, match="missing.bin"):
        manifest.build_manifest(fs, d, precomputed={"missing.bin": FileEntry("missing.bin", 1, "")})


def _committed_with_epoch(fs, root: str, step: int, epoch: int | None) -> str:
    tmp = catalog.tmp_dir(root, step)
    _write(fs, storage.join(tmp, "__0_0.distcp"), f"weights-{step}".encode())
    manifest.build_manifest(fs, tmp, meta={"step": step}, epoch=epoch)
    final = catalog.step_dir(root, step)
    catalog.commit(fs, tmp, final)
    return final


def test_manifest_digest_is_the_blake3_of_its_exact_bytes_and_says_so(store):
    fs, root = store
    final = _save(fs, root, 4)
    raw = fs.cat_file(storage.join(final, MANIFEST_NAME))
    assert manifest.manifest_digest(fs, final) == "blake3:" + blake3.blake3(raw).hexdigest()
    # Any change to the bytes, even one that parses the same, changes the digest.
    _write(fs, storage.join(final, MANIFEST_NAME), raw + b"\n")
    manifest.verify(fs, final)
    assert manifest.manifest_digest(fs, final) != "blake3:" + blake3.blake3(raw).hexdigest()
    fs.rm(storage.join(final, MANIFEST_NAME))
    with pytest.raises(CheckpointInvalid, match="MANIFEST.json is missing"):
        manifest.manifest_digest(fs, final)


def test_the_manifest_records_the_committing_epoch(store):
    fs, root = store
    doc = manifest.verify(fs, _committed_with_epoch(fs, root, 2, epoch=7))
    assert doc["epoch"] == 7 and manifest.manifest_epoch(doc) == 7
    doc = manifest.verify(fs, _committed_with_epoch(fs, root, 3, epoch=None))
    assert manifest.manifest_epoch(doc) is None


@pytest.mark.parametrize("epoch", ["7", True, 1.5, [1]])
def test_a_malformed_epoch_does_not_parse(store, epoch):
    fs, root = store
    final = _committed_with_epoch(fs, root, 2, epoch=1)
    doc = json.loads(fs.cat_file(storage.join(final, MANIFEST_NAME)))
    _write(fs, storage.join(final, MANIFEST_NAME), json.dumps({**doc, "epoch": epoch}).encode())
    with pytest.raises(CheckpointInvalid, match="has a malformed epoch"):
        manifest.verify(fs, final)


def test_verify_checks_the_files_against_the_bytes_it_is_given(store):
    fs, root = store
    final = _save(fs, root, 5, {"__0_0.distcp": b"honest"})
    honest = fs.cat_file(storage.join(final, MANIFEST_NAME))
    _write(fs, storage.join(final, "__0_0.distcp"), b"forged")
    manifest.build_manifest(fs, final, meta={"step": 5})  # a store rewrites its manifest
    manifest.verify(fs, final)  # what the store now says verifies...
    with pytest.raises(CheckpointInvalid, match="__0_0.distcp has blake3"):
        manifest.verify(fs, final, raw=honest)  # ...but not against the bytes recorded


def test_committed_manifests_digest_and_epoch_per_step(store):
    fs, root = store
    _committed_with_epoch(fs, root, 3, epoch=1)
    _committed_with_epoch(fs, root, 6, epoch=2)
    _save(fs, root, 9)  # by hand: no epoch
    # Neither a save in flight nor a directory whose manifest does not parse is recorded.
    _write(fs, storage.join(catalog.tmp_dir(root, 12), "__0_0.distcp"), b"in flight")
    broken = _committed_with_epoch(fs, root, 15, epoch=2)
    _write(fs, storage.join(broken, MANIFEST_NAME), b"{not json")
    warnings: list[str] = []
    got = catalog.committed_manifests(fs, root, warn=warnings.append)
    assert set(got) == {3, 6, 9}
    for step, (digest, _) in got.items():
        assert digest == manifest.manifest_digest(fs, catalog.step_dir(root, step))
    assert {step: epoch for step, (_, epoch) in got.items()} == {3: 1, 6: 2, 9: None}
    assert len(warnings) == 1 and "step-000000015: MANIFEST.json is not valid JSON" in warnings[0]


def test_require_step_is_exactly_that_step(store):
    fs, root = store
    for step in (3, 6):
        _save(fs, root, step)
    assert catalog.require_step(fs, root, 3) == catalog.step_dir(root, 3)
    url = fs.unstrip_protocol(root)
    with pytest.raises(catalog.CheckpointNotFound) as missing:
        catalog.require_step(fs, root, 4)
    assert str(missing.value) == f"checkpoint step 4 is not committed in {url}"
    assert isinstance(missing.value, FileNotFoundError)
    _write(fs, storage.join(catalog.step_dir(root, 3), "__0_0.distcp"), b"short")
    with pytest.raises(catalog.CheckpointNotFound, match="step 3 in .* does not verify: step-0"):
        catalog.require_step(fs, root, 3, check_hashes=False)
    e = pickle.loads(pickle.dumps(missing.value))
    assert isinstance(e, catalog.CheckpointNotFound) and str(e) == str(missing.value)


def test_remove_superseded_only_removes_an_older_epochs_step(store):
    fs, root = store
    _committed_with_epoch(fs, root, 3, epoch=1)
    _committed_with_epoch(fs, root, 6, epoch=2)
    _save(fs, root, 9)  # by hand
    warnings: list[str] = []
    assert catalog.remove_superseded(fs, root, 3, epoch=2, warn=warnings.append) is True
    assert catalog.remove_superseded(fs, root, 6, epoch=2, warn=warnings.append) is False
    assert catalog.remove_superseded(fs, root, 9, epoch=2, warn=warnings.append) is True
    assert catalog.remove_superseded(fs, root, 12, epoch=2, warn=warnings.append) is False
    assert catalog.committed_steps(fs, root) == [6]
    assert warnings == [
        "removing checkpoint step 3 of epoch 1: a superseded line (this is 2)",
        "removing checkpoint step 9 of epoch None: a superseded line (this is 2)",
    ]


def test_checkpoint_invalid_pickles():
    e = pickle.loads(pickle.dumps(CheckpointInvalid("/r/step-000000001", "a", "is missing")))
    assert (e.dir_path, e.file, e.reason) == ("/r/step-000000001", "a", "is missing")
    assert str(e) == "step-000000001: a is missing"


@settings(max_examples=25, deadline=None)
@given(
    data=st.data(),
    steps=st.sets(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=6),
)
def test_latest_verified_is_max_uncorrupted(data, steps):
    corrupted = data.draw(st.sets(st.sampled_from(sorted(steps))))
    kinds = data.draw(
        st.lists(
            st.sampled_from(["truncate", "flip", "drop_manifest", "drop_file"]),
            min_size=len(corrupted),
            max_size=len(corrupted),
        )
    )
    fs, root = _memory_root()
    try:
        for step in steps:
            _save(fs, root, step, {"__0_0.distcp": step.to_bytes(8, "little") * 4})
        for step, kind in zip(sorted(corrupted), kinds, strict=True):
            final = catalog.step_dir(root, step)
            shard = storage.join(final, "__0_0.distcp")
            if kind == "truncate":
                _write(fs, shard, b"short")
            elif kind == "flip":
                _write(fs, shard, (step ^ 1).to_bytes(8, "little") * 4)
            elif kind == "drop_manifest":
                fs.rm(storage.join(final, MANIFEST_NAME))
            else:
                fs.rm(shard)
        warnings: list[str] = []
        got = catalog.latest_verified(fs, root, warn=warnings.append)
        good = steps - corrupted
        expected = max(good) if good else None
        assert (got[0] if got else None) == expected
        # Exactly the corrupted checkpoints newer than the answer were reported; on an object
        # store a step dir without a manifest is not a checkpoint yet, so nothing to report.
        reported = [
            s
            for s, kind in zip(sorted(corrupted), kinds, strict=True)
            if (expected is None or s > expected)
            and (kind != "drop_manifest" or catalog.renames_atomically(fs))
        ]
        assert len(warnings) == len(reported)
    finally:
        storage.remove_tree(fs, root)


def test_memory_roots_leave_nothing_behind():
    # Every memory root above is removed on teardown, so whatever ran before this test
    # must have left the process-wide memory fs free of test data.
    fs = fsspec.filesystem("memory")
    leaked = [p for p in list(fs.store) + list(fs.pseudo_dirs) if "spillway-test-" in p]
    assert leaked == []
