"""The job's fence, and the Checkpointer that obeys it: a stale attempt commits and deletes
nothing. Also which step a run resumes from (checkpoint.resume_step)."""

from __future__ import annotations

import json
import pickle
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from orchestrator.checkpoint import catalog, storage
from orchestrator.checkpoint.catalog import CheckpointNotFound
from orchestrator.checkpoint.distributed import Checkpointer, CheckpointSaveFailed
from orchestrator.checkpoint.fence import Fenced, read_fence, write_fence
from tests.unit.single_rank import one_rank, storage_root, tiny_model

KINDS = ["local", "memory"]


@pytest.fixture(params=KINDS)
def root_url(request, tmp_path) -> Iterator[str]:
    with storage_root(request.param, tmp_path) as url:
        yield url


# ---- the fence file ----------------------------------------------------------------------


def test_write_then_read(root_url):
    url = f"{root_url}/fence.json"
    assert read_fence(url, {}) is None  # no fence yet: nothing newer exists
    write_fence(url, {}, epoch=1, attempt=1)
    assert read_fence(url, {}) == 1
    write_fence(url, {}, epoch=3, attempt=2)
    assert read_fence(url, {}) == 3
    fs, path = storage.open_root(url)
    assert json.loads(fs.cat_file(path)) == {"epoch": 3, "attempt": 2}
    if fs.protocol[0] in ("file", "local"):
        # Written beside and renamed: nothing but the fence is left in its directory.
        assert [p.rsplit("/", 1)[-1] for p in fs.ls(root_url)] == ["fence.json"]


@pytest.mark.parametrize("content", [b"not json", b"[1]", b'{"epoch": "2"}', b'{"epoch": true}'])
def test_a_fence_that_is_not_one_is_an_error_naming_it(root_url, content):
    url = f"{root_url}/fence.json"
    fs, path = storage.open_root(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, content)
    with pytest.raises(OSError, match=f"fence {url}"):
        read_fence(url, {})


@pytest.mark.parametrize("epoch, attempt", [(-1, 1), (1, -1), (True, 1), ("1", 1)])
def test_bad_fence_arguments(root_url, epoch, attempt):
    with pytest.raises(ValueError, match="must be an integer >= 0"):
        write_fence(f"{root_url}/fence.json", {}, epoch=epoch, attempt=attempt)


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never answers: a hung store."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()
        self.thread.join(timeout=5)


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def test_a_read_that_hangs_times_out_naming_the_url(silent_server):
    url = f"http://127.0.0.1:{silent_server.port}/job/fence.json"
    with pytest.raises(OSError, match=f"reading the fence {url} timed out after 0.5s"):
        read_fence(url, {}, timeout_s=0.5)


def test_a_write_that_hangs_times_out_naming_the_url(silent_server):
    url = f"http://127.0.0.1:{silent_server.port}/job/fence.json"
    with pytest.raises(OSError, match=f"writing the fence {url} "):
        write_fence(url, {}, epoch=2, attempt=2, timeout_s=0.5)


def test_a_refused_read_fails_naming_the_url():
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/fence.json"  # nothing listens there now
    with pytest.raises(OSError, match=f"reading the fence {url} failed"):
        read_fence(url, {}, timeout_s=10)


def test_fenced_names_both_epochs_and_pickles():
    e = pickle.loads(pickle.dumps(Fenced(1, 2)))
    assert (e.epoch, e.fence_epoch) == (1, 2)
    assert "epoch 1" in str(e) and "epoch 2" in str(e)


# ---- the Checkpointer under a fence --------------------------------------------------------


def committed(url: str) -> list[int]:
    fs, root = storage.open_root(url)
    return sorted(catalog.committed_steps(fs, root))


def epochs(url: str) -> dict[int, int | None]:
    fs, root = storage.open_root(url)
    return {step: epoch for step, (_, epoch) in catalog.committed_manifests(fs, root).items()}


def step_dirs(url: str) -> list[str]:
    fs, root = storage.open_root(url)
    fs.invalidate_cache(root)
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))


def attempt(url: str, epoch: int, **kw) -> Checkpointer:
    return Checkpointer(url, keep=2, epoch=epoch, fence_url=f"{url}/fence.json", **kw)


def test_commits_record_the_epoch(tmp_path, root_url):
    fence = f"{root_url}/fence.json"
    write_fence(fence, {}, epoch=1, attempt=1)
    with one_rank(tmp_path):
        model, optimizer = tiny_model()
        ckpt = attempt(root_url, 1)
        ckpt.save(1, model, optimizer, {})
        ckpt.close()
        by_hand = Checkpointer(root_url, keep=2)
        by_hand.save(2, model, optimizer, {})
        by_hand.close()
    assert epochs(root_url) == {1: 1, 2: None}


def test_commit_is_refused_once_a_newer_epoch_holds_the_fence(tmp_path, root_url):
    fence = f"{root_url}/fence.json"
    write_fence(fence, {}, epoch=1, attempt=1)
    with one_rank(tmp_path):
        model, optimizer = tiny_model()
        ckpt = attempt(root_url, 1, async_save=True)
        for step in (1, 2):
            ckpt.save(step, model, optimizer, {})
            ckpt.wait()
        ckpt.save(3, model, optimizer, {})  # staged while this epoch still held the fence
        while ckpt.writing():  # written in the background: the refusal here is the commit's
            time.sleep(0.01)
        write_fence(fence, {}, epoch=2, attempt=2)
        with pytest.raises(Fenced, match="epoch 1.*epoch 2"):
            ckpt.wait()
        ckpt.close()
    assert committed(root_url) == [1, 2]  # step 3 not committed, and step 1 not pruned
    staged = "step-000000003.tmp" if not root_url.startswith("memory") else "step-000000003"
    assert staged in step_dirs(root_url)  # left manifest-less: the catalog never lists it


def test_an_async_save_checks_the_fence_in_the_background_and_writes_nothing(tmp_path, root_url):
    fence = f"{root_url}/fence.json"
    write_fence(fence, {}, epoch=1, attempt=1)
    with one_rank(tmp_path):
        model, optimizer = tiny_model()
        ckpt = attempt(root_url, 1, async_save=True)
        ckpt.save(1, model, optimizer, {})
        ckpt.wait()
        write_fence(fence, {}, epoch=2, attempt=2)
        ckpt.save(2, model, optimizer, {})  # returns once staged: the fence is read after
        with pytest.raises(Fenced, match="epoch 1.*epoch 2"):
            ckpt.wait()
        ckpt.close()
    assert [n for n in step_dirs(root_url) if n.startswith("step-")] == ["step-000000001"]


def test_save_is_refused_before_anything_is_written(tmp_path, root_url):
    fence = f"{root_url}/fence.json"
    write_fence(fence, {}, epoch=1, attempt=1)
    with one_rank(tmp_path):
        model, optimizer = tiny_model()
        ckpt = attempt(root_url, 1)
        ckpt.save(1, model, optimizer, {})
        write_fence(fence, {}, epoch=2, attempt=2)
        with pytest.raises(Fenced):
            ckpt.save(2, model, optimizer, {})
        ckpt.close()
    assert [n for n in step_dirs(root_url) if n.startswith("step-")] == ["step-000000001"]


def test_an_attempt_under_a_fence_never_prunes_and_a_run_by_hand_does(tmp_path, root_url):
    # Under a controller the controller prunes: a partitioned attempt that has not seen its
    # fence yet would otherwise delete the step the next attempt is told to resume from.
    write_fence(f"{root_url}/fence.json", {}, epoch=1, attempt=1)
    by_hand_url = f"{root_url}/by-hand"
    with one_rank(tmp_path):
        model, optimizer = tiny_model()
        for ckpt in (attempt(root_url, 1), Checkpointer(by_hand_url, keep=2)):
            for step in (1, 2, 3):
                ckpt.save(step, model, optimizer, {})
            ckpt.close()
    assert committed(root_url) == [1, 2, 3]
    assert committed(by_hand_url) == [2, 3]  # keep=2


def test_the_controllers_prune_keeps_the_current_epochs_newest(tmp_path, root_url):
    fence = f"{root_url}/fence.json"
    write_fence(fence, {}, epoch=1, attempt=1)
    with one_rank(tmp_path):
        model, optimizer = tiny_model()
        zombie = attempt(root_url, 1)
        for step in (1, 2, 3, 4):
            zombie.save(step, model, optimizer, {})
        zombie.close()
        write_fence(fence, {}, epoch=2, attempt=2)
        newer = attempt(root_url, 2)  # resumed from step 2: steps 3 and 4 are the zombie's
        newer.save(3, model, optimizer, {})
        newer.close()
    fs, root = storage.open_root(root_url)
    # One checkpoint of epoch 2 is fewer than keep=2: nothing is surplus yet.
    assert catalog.prune(fs, root, keep=2, epoch=2) == []
    with one_rank(tmp_path):
        newer = attempt(root_url, 2)
        newer.save(5, model, optimizer, {})
        newer.close()
    # Epoch 2's 3 and 5 are kept; the zombie's 4 between them is never counted nor deleted.
    assert catalog.prune(fs, root, keep=2, epoch=2) == [2, 1]
    assert committed(root_url) == [3, 4, 5]


def test_a_stale_attempt_does_not_even_clear_debris(tmp_path, root_url):
    fence = f"{root_url}/fence.json"
    write_fence(fence, {}, epoch=5, attempt=5)
    fs, root = storage.open_root(root_url)
    debris = storage.join(catalog.staging_path(fs, root, 7), "__0_0.distcp")
    fs.makedirs(debris.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(debris, b"half a save of the newer attempt")
    with one_rank(tmp_path):
        with pytest.raises(Fenced, match="epoch 4"):
            attempt(root_url, 4)
    assert fs.cat_file(debris) == b"half a save of the newer attempt"


def test_an_unreadable_fence_commits_nothing(tmp_path, root_url):
    fence = f"{root_url}/fence.json"
    write_fence(fence, {}, epoch=1, attempt=1)
    with one_rank(tmp_path):
        model, optimizer = tiny_model()
        ckpt = attempt(root_url, 1, async_save=True)
        ckpt.save(1, model, optimizer, {})
        while ckpt.writing():
            time.sleep(0.01)
        fs, path = storage.open_root(fence)
        fs.pipe_file(path, b"garbage")
        with pytest.raises(OSError, match="fence .* is not JSON"):
            ckpt.wait()
        ckpt.close()
    assert committed(root_url) == []


def test_an_async_save_that_fails_in_the_background_never_commits(tmp_path, root_url):
    fence = f"{root_url}/fence.json"
    write_fence(fence, {}, epoch=1, attempt=1)
    with one_rank(tmp_path):
        model, optimizer = tiny_model()
        ckpt = attempt(root_url, 1, async_save=True)
        fs, path = storage.open_root(fence)
        fs.pipe_file(path, b"garbage")
        ckpt.save(1, model, optimizer, {})  # returns once staged: the fence is read after
        with pytest.raises(CheckpointSaveFailed, match="rank 0: OSError: fence .* is not JSON"):
            ckpt.wait()
        ckpt.close()
    assert committed(root_url) == []
    assert [n for n in step_dirs(root_url) if n.startswith("step-")] == []


def test_without_a_fence_url_nothing_is_checked(tmp_path, root_url):
    write_fence(f"{root_url}/fence.json", {}, epoch=99, attempt=99)
    with one_rank(tmp_path):
        model, optimizer = tiny_model()
        ckpt = Checkpointer(root_url, keep=2, epoch=1)  # e.g. a bench run: no fence named
        ckpt.save(1, model, optimizer, {})
        ckpt.close()
    assert committed(root_url) == [1]


def test_a_fence_url_needs_an_epoch(tmp_path, root_url):
    with one_rank(tmp_path):
        with pytest.raises(ValueError, match="fence_url needs checkpoint.epoch"):
            Checkpointer(root_url, keep=2, fence_url=f"{root_url}/fence.json")


def test_the_newer_line_replaces_a_superseded_step(tmp_path, root_url):
    fence = f"{root_url}/fence.json"
    write_fence(fence, {}, epoch=1, attempt=1)
    with one_rank(tmp_path):
        model, optimizer = tiny_model()
        zombie = attempt(root_url, 1)
        for step in (2, 4):
            zombie.save(step, model, optimizer, {})
        zombie.close()
        write_fence(fence, {}, epoch=2, attempt=2)
        # The newer attempt resumed from step 2; the zombie's step 4 is not on its line, and
        # commit never replaces a verified checkpoint, so without this it could not pass step 4.
        newer = attempt(root_url, 2)
        newer.save(4, model, optimizer, {})
        newer.close()
        # The same epoch's own checkpoint is never replaced.
        again = attempt(root_url, 2)
        with pytest.raises(FileExistsError, match="verified checkpoint already exists"):
            again.save(4, model, optimizer, {})
        again.close()
    assert epochs(root_url) == {2: 1, 4: 2}


# ---- checkpoint.resume_step ----------------------------------------------------------------


def test_resume_step_none_newest_zero_scratch_n_exactly_n(tmp_path, root_url):
    with one_rank(tmp_path):
        model, optimizer = tiny_model()
        ckpt = Checkpointer(root_url, keep=3)
        for step in (3, 6, 9):
            ckpt.save(step, model, optimizer, {})
        assert ckpt.resume_step(None) == 9
        assert ckpt.resume_step(0) is None
        assert ckpt.resume_step(6) == 6  # a newer committed step beside it changes nothing
        with pytest.raises(CheckpointNotFound) as missing:
            ckpt.resume_step(7)
        assert isinstance(missing.value, FileNotFoundError)  # infrastructure, not the user's
        assert str(missing.value) == f"checkpoint step 7 is not committed in {ckpt._url(ckpt.root)}"
        with pytest.raises(ValueError, match="resume_step must be null or >= 0"):
            ckpt.resume_step(-1)
        ckpt.close()


def test_resume_step_that_does_not_verify_is_not_replaced_by_another(tmp_path, root_url):
    with one_rank(tmp_path):
        model, optimizer = tiny_model()
        ckpt = Checkpointer(root_url, keep=3)
        for step in (3, 6):
            ckpt.save(step, model, optimizer, {})
        fs, root = storage.open_root(root_url)
        shard = storage.join(catalog.step_dir(root, 6), "__0_0.distcp")
        data = bytearray(fs.cat_file(shard))
        data[len(data) // 2] ^= 0xFF
        fs.pipe_file(shard, bytes(data))
        with pytest.raises(CheckpointNotFound, match="checkpoint step 6 in .* does not verify"):
            ckpt.resume_step(6)
        # Told the controller's copy checked every byte here, it checks sizes only: the one
        # flipped byte (same size) is the copy's to catch, and it would have.
        assert ckpt.resume_step(6, verified=True) == 6
        fs.pipe_file(shard, bytes(data[:-1]))
        with pytest.raises(CheckpointNotFound, match="does not verify"):
            ckpt.resume_step(6, verified=True)  # a short file is still refused
        ckpt.close()
