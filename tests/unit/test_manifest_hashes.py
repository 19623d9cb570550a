"""Manifests name their hash: BLAKE3 (new) and sha256 (version 1, and recorded bare digests)
both verify and copy; a corrupted byte or a wrong digest is caught by either. Real files on
local disk and memory://, and a real DCP save through the hashing writer."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator

import blake3
import pytest
import torch
import torch.distributed.checkpoint as dcp

from orchestrator.checkpoint import catalog, hashing, manifest, storage, transfer
from orchestrator.checkpoint.hashing_writer import HashingFsspecWriter
from orchestrator.checkpoint.manifest import MANIFEST_NAME, CheckpointInvalid
from orchestrator.checkpoint.transfer import copy_checkpoint

FILES = {
    "__0_0.distcp": bytes(range(256)) * 40 + b"tail",
    "model/nested/x.bin": b"nested bytes",
    "empty.bin": b"",
}
STEP = 7


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch):
    monkeypatch.setattr(transfer, "RETRY_BACKOFF_S", 0.0)


@pytest.fixture
def roots(tmp_path) -> Iterator:
    made: list[str] = []

    def make(kind: str) -> str:
        name = f"spillway-hash-{uuid.uuid4().hex}"
        if kind == "local":
            return str(tmp_path / name)
        made.append(f"memory://{name}")
        return made[-1]

    yield make
    for url in made:
        fs, root = storage.open_root(url)
        storage.remove_tree(fs, root)


def _write_files(url: str, step: int) -> tuple[object, str]:
    fs, root = storage.open_root(url)
    tmp = catalog.staging_path(fs, root, step)
    for rel, data in FILES.items():
        path = storage.join(tmp, rel)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, data)
    return fs, root


def _commit(fs, root: str, step: int) -> str:
    final = catalog.step_dir(root, step)
    catalog.commit(fs, catalog.staging_path(fs, root, step), final)
    return final


def _save(url: str, algorithm: str, step: int = STEP) -> str:
    fs, root = _write_files(url, step)
    manifest.build_manifest(fs, catalog.staging_path(fs, root, step), {"step": step}, None, 3,
                            algorithm)  # fmt: skip
    return _commit(fs, root, step)


def _save_v1(url: str, step: int = STEP) -> str:
    """A checkpoint as the code before BLAKE3 committed it: manifest version 1, sha256."""
    fs, root = _write_files(url, step)
    tmp = catalog.staging_path(fs, root, step)
    files = [
        {"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for rel, data in sorted(FILES.items())
    ]
    doc = {"version": 1, "files": files, "meta": {"step": step}, "epoch": 3}
    fs.pipe_file(storage.join(tmp, MANIFEST_NAME), json.dumps(doc, indent=1, sort_keys=True).encode())
    return _commit(fs, root, step)


def _flip_a_byte(url: str, step: int, rel: str = "__0_0.distcp") -> None:
    fs, root = storage.open_root(url)
    path = storage.join(catalog.step_dir(root, step), rel)
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0x01  # same size: only the hash can tell
    fs.pipe_file(path, bytes(data))


def _manifest_bytes(url: str, step: int = STEP) -> bytes:
    fs, root = storage.open_root(url)
    return fs.cat_file(storage.join(catalog.step_dir(root, step), MANIFEST_NAME))


SAVES = {"blake3": lambda url: _save(url, "blake3"), "sha256": lambda url: _save(url, "sha256"),
         "v1": _save_v1}  # fmt: skip
ALGORITHM = {"blake3": "blake3", "sha256": "sha256", "v1": "sha256"}


@pytest.mark.parametrize("kind", ["local", "memory"])
@pytest.mark.parametrize("save", list(SAVES))
def test_each_kind_of_manifest_verifies_and_a_flipped_byte_is_caught(roots, kind, save):
    url = roots(kind)
    final = SAVES[save](url)
    fs, _ = storage.open_root(url)
    doc = manifest.verify(fs, final)
    assert doc["algorithm"] == ALGORITHM[save]
    assert doc["version"] == (1 if save == "v1" else 2)
    want = {rel: hashlib.sha256(d).hexdigest() if ALGORITHM[save] == "sha256"
            else blake3.blake3(d).hexdigest() for rel, d in FILES.items()}  # fmt: skip
    assert {e.path: e.hexdigest for e in manifest.entries(doc)} == want
    _flip_a_byte(url, STEP)
    manifest.verify(fs, final, check_hashes=False)  # sizes alone cannot see it
    with pytest.raises(CheckpointInvalid) as err:
        manifest.verify(fs, final)
    assert err.value.file == "__0_0.distcp"
    assert err.value.reason.startswith(f"has {ALGORITHM[save]} ")


def test_new_manifests_name_blake3_in_each_entry(roots):
    url = roots("local")
    _save(url, hashing.DEFAULT)
    doc = json.loads(_manifest_bytes(url))
    assert (doc["version"], doc["algorithm"]) == (2, "blake3")
    assert all(set(f) == {"path", "size", "blake3"} for f in doc["files"])


@pytest.mark.parametrize(
    "change, why",
    [
        ({"algorithm": "md5"}, "unsupported hash algorithm 'md5'"),
        ({"algorithm": None}, "unsupported hash algorithm None"),
        ({"version": 3}, "unsupported version 3"),
    ],
)
def test_an_unknown_algorithm_or_version_does_not_parse(roots, change, why):
    url = roots("memory")
    final = _save(url, "blake3")
    doc = {**json.loads(_manifest_bytes(url)), **change}
    with pytest.raises(CheckpointInvalid, match=why):
        manifest.parse_manifest(final, json.dumps(doc).encode())


def test_entries_must_carry_the_named_algorithms_hash(roots):
    url = roots("memory")
    final = _save(url, "blake3")
    doc = json.loads(_manifest_bytes(url))
    doc["algorithm"] = "sha256"  # the entries carry "blake3", not "sha256"
    with pytest.raises(CheckpointInvalid, match="malformed file entry"):
        manifest.parse_manifest(final, json.dumps(doc).encode())
    v1 = {**doc, "version": 1}
    with pytest.raises(CheckpointInvalid, match="version 1 but names an algorithm"):
        manifest.parse_manifest(final, json.dumps(v1).encode())


def test_one_manifest_one_algorithm(roots):
    url = roots("local")
    fs, root = _write_files(url, STEP)
    tmp = catalog.staging_path(fs, root, STEP)
    old = manifest.hash_file(fs, storage.join(tmp, "empty.bin"), "empty.bin", "sha256")
    with pytest.raises(ValueError, match="empty.bin"):
        manifest.build_manifest(fs, tmp, precomputed={"empty.bin": old})


# --- the verified copy ----------------------------------------------------------------------

PAIRS = [("local", "local"), ("local", "memory"), ("memory", "local")]


@pytest.mark.parametrize("src_kind, dst_kind", PAIRS)
@pytest.mark.parametrize("save", list(SAVES))
def test_each_kind_copies_byte_for_byte_and_a_flipped_byte_is_refused(
    roots, src_kind, dst_kind, save
):
    src, dst = roots(src_kind), roots(dst_kind)
    SAVES[save](src)
    res = copy_checkpoint(src, dst, STEP)
    assert (res.files, res.bytes, res.attempts) == (len(FILES), sum(map(len, FILES.values())), 1)
    assert _manifest_bytes(dst) == _manifest_bytes(src)
    fs, root = storage.open_root(dst)
    final = catalog.step_dir(root, STEP)
    manifest.verify(fs, final)
    for rel, data in FILES.items():
        assert fs.cat_file(storage.join(final, rel)) == data

    other = roots(dst_kind)
    _flip_a_byte(src, STEP)
    with pytest.raises(CheckpointInvalid) as err:
        copy_checkpoint(src, other, STEP, retries=1)
    assert err.value.file == "__0_0.distcp"
    assert err.value.reason.startswith(f"has {ALGORITHM[save]} ")
    ofs, oroot = storage.open_root(other)
    assert catalog.committed_steps(ofs, oroot) == []


def test_a_large_file_copies_in_many_chunks_disk_to_disk(roots):
    # Chunks not a multiple of a page, and a file of many of them: the kernel copy's offsets.
    src, dst = roots("local"), roots("local")
    fs, root = storage.open_root(src)
    tmp = catalog.staging_path(fs, root, 1)
    big = bytes(range(251)) * 4099
    fs.makedirs(tmp, exist_ok=True)
    fs.pipe_file(storage.join(tmp, "big.bin"), big)
    manifest.build_manifest(fs, tmp)
    _commit(fs, root, 1)
    seen: list[int] = []
    copy_checkpoint(src, dst, 1, chunk_bytes=10_007, progress=lambda done, _: seen.append(done))
    assert seen[-1] == len(big) and len(seen) > 100
    dfs, droot = storage.open_root(dst)
    assert dfs.cat_file(storage.join(catalog.step_dir(droot, 1), "big.bin")) == big


@pytest.mark.parametrize("save", list(SAVES))
def test_a_recorded_digest_old_or_new_style_checks_and_a_wrong_one_is_refused(roots, save):
    src = roots("memory")
    SAVES[save](src)
    raw = _manifest_bytes(src)
    fs, root = storage.open_root(src)
    new_style = manifest.manifest_digest(fs, catalog.step_dir(root, STEP))
    assert new_style == "blake3:" + blake3.blake3(raw).hexdigest()
    old_style = hashlib.sha256(raw).hexdigest()  # what the controller recorded before
    upper = "blake3:" + new_style.removeprefix("blake3:").upper()
    for recorded in (new_style, old_style, "sha256:" + old_style, upper):
        dst = roots("local")
        assert copy_checkpoint(src, dst, STEP, expected_manifest_digest=recorded).attempts == 1
        assert _manifest_bytes(dst) == raw

    wrong_blake3 = "blake3:" + blake3.blake3(raw + b" ").hexdigest()
    wrong_sha256 = hashlib.sha256(raw + b" ").hexdigest()
    swapped = "blake3:" + old_style  # a sha256 hex labelled blake3 is a wrong blake3
    for recorded in (wrong_blake3, wrong_sha256, swapped):
        dst = roots("local")
        with pytest.raises(CheckpointInvalid, match="does not match the digest recorded"):
            copy_checkpoint(src, dst, STEP, retries=2, expected_manifest_digest=recorded)
        dfs, droot = storage.open_root(dst)
        assert catalog.committed_steps(dfs, droot) == []


@pytest.mark.parametrize("bad", ["ab", "md5:" + "0" * 64, "blake3:" + "0" * 63, "blake3:", ""])
def test_a_malformed_digest_is_an_error_before_anything_is_read(roots, bad):
    with pytest.raises(ValueError):
        copy_checkpoint(roots("memory"), roots("local"), STEP, expected_manifest_digest=bad)
    with pytest.raises(ValueError):
        manifest.check_digest("/x", b"{}", bad)


def test_digest_spelling():
    raw = b'{"version": 2}'
    assert manifest.digest_of(raw) == "blake3:" + blake3.blake3(raw).hexdigest()
    assert manifest.digest_of(raw, "sha256") == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert hashing.parse_digest(hashlib.sha256(raw).hexdigest()) == (
        "sha256",
        hashlib.sha256(raw).hexdigest(),
    )


# --- DCP's writer, hashing as it writes -----------------------------------------------------


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_the_dcp_writer_hashes_every_file_it_writes_as_a_reread_would(roots, kind):
    url = roots(kind)
    fs, root = storage.open_root(url)
    fs.makedirs(root, exist_ok=True)
    state = {"w": torch.arange(10_000, dtype=torch.float32), "b": torch.ones(3, 5), "n": 7}
    writer = HashingFsspecWriter(url)
    dcp.save(state, storage_writer=writer, no_dist=True)
    got = writer.entries()
    files = set(manifest.list_files(fs, root))
    assert set(got) == files and ".metadata" in files and len(files) >= 2
    for rel, entry in got.items():
        assert entry == manifest.hash_file(fs, storage.join(root, rel), rel)
    # The entries commit a checkpoint that verifies in full, and loads.
    manifest.build_manifest(fs, root, precomputed=got)
    manifest.verify(fs, root)
    back = {"w": torch.zeros(10_000), "b": torch.zeros(3, 5), "n": 0}
    dcp.load(back, checkpoint_id=url, no_dist=True)
    assert torch.equal(back["w"], state["w"]) and back["n"] == 7


def test_the_dcp_writer_forgets_an_earlier_save(roots):
    url = roots("memory")
    writer = HashingFsspecWriter(url, algorithm="sha256")
    dcp.save({"w": torch.ones(4)}, storage_writer=writer, no_dist=True)
    first = writer.entries()
    writer.reset()
    assert writer.entries() == {}
    assert all(e.algorithm == "sha256" for e in first.values())
