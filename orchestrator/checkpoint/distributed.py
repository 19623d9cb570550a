"""Committed checkpoints of a sharded model and optimizer, through torch.distributed.checkpoint.

DCP writes one file per rank plus `.metadata`, in a layout any world size can load: resharding
happens on load. Around it runs the commit protocol of catalog.py: everything goes into
`step-N.tmp/` (on an object store, `step-N/`), each rank hashes the files it wrote, rank 0 writes
the manifest last and, on a local disk, renames.
Rank 0 alone picks the checkpoint to load and tells the others, so every rank resumes the same
step even if a listing or a verification would differ between them.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.manifest import FileEntry, build_manifest, hash_file
from orchestrator.checkpoint.rng import capture_rng, restore_rng
from orchestrator.checkpoint.storage import join, open_root

log = logging.getLogger("spillway.checkpoint")

TRAINER_STATE = "trainer_state.json"


def _rng_file(rank: int) -> str:
    return f"rng/rank-{rank:05d}.pt"


class CheckpointSaveFailed(RuntimeError):
    def __init__(self, step: int, failed: dict[int, str]) -> None:
        self.step, self.failed = step, failed
        ranks = "; ".join(f"rank {r}: {why}" for r, why in sorted(failed.items()))
        super().__init__(f"checkpoint step {step} was not committed ({ranks})")


@dataclass
class PendingSave:
    step: int
    tmp_path: str
    hashed: Future  # this rank's FileEntry list, ready once its DCP writes are done
    started: float


class Checkpointer:
    """Save, find and load committed checkpoints under one storage root, on every rank."""

    def __init__(
        self,
        url: str,
        keep: int,
        async_save: bool = False,
        verify_hashes: bool = True,
        timeout_s: int = 600,
        on_commit: Callable[[int, float], None] | None = None,
    ) -> None:
        self.url = url
        # Called on rank 0 with (step, seconds from the save's start) once a step is committed.
        self.on_commit = on_commit
        self.fs, self.root = open_root(url)
        self.keep = keep
        self.async_save = async_save
        self.verify_hashes = verify_hashes
        self.timeout_s = timeout_s
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        timeout = timedelta(seconds=timeout_s)
        # Small control messages go over gloo whatever the training backend; async saves get a
        # group of their own, since its collectives run on a background thread.
        self._ctrl = dist.new_group(backend="gloo", timeout=timeout)
        self._async_pg = dist.new_group(backend="gloo", timeout=timeout) if async_save else None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-hash")
        self._pending: PendingSave | None = None
        self.last_save_blocking_s = 0.0
        # Start of the last committed save to its commit, on rank 0: what a drain's save costs.
        self.last_commit_s: float | None = None
        if self.rank == 0:
            self.fs.makedirs(self.root, exist_ok=True)
            for name in catalog.remove_stale_tmp(self.fs, self.root):
                log.warning("removed %s: an unfinished save, never committed", name)
        dist.barrier(group=self._ctrl)

    def _url(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    # ---- finding and loading -------------------------------------------------------------

    def latest_step(self) -> int | None:
        """The newest checkpoint that verifies, as chosen by rank 0 and agreed by all ranks."""
        choice: list[int | None] = [None]
        if self.rank == 0:
            found = catalog.latest_verified(
                self.fs, self.root, warn=log.warning, check_hashes=self.verify_hashes
            )
            choice = [found[0] if found else None]
        dist.broadcast_object_list(choice, src=0, group=self._ctrl)
        return choice[0]

    def read_state(self, step: int) -> dict:
        """The trainer state saved with step: small, read before any tensor is loaded."""
        path = catalog.step_dir(self.root, step)
        return json.loads(self.fs.cat_file(join(path, TRAINER_STATE)))

    def load(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        """Load step into the (sharded) model and optimizer, resharding to this world size.

        Returns whether this rank's RNG state was restored: per-rank streams only mean the same
        thing on the same number of ranks, so on another world size the caller reseeds.
        """
        path = catalog.step_dir(self.root, step)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        sd = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, storage_reader=FsspecReader(self._url(path)))
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        rng_path = join(path, _rng_file(self.rank))
        same_world = self.read_state(step)["world_size"] == self.world_size
        if same_world and self.fs.exists(rng_path):
            restore_rng(torch.load(io.BytesIO(self.fs.cat_file(rng_path)), weights_only=False))
            return True
        return False

    # ---- saving --------------------------------------------------------------------------

    def save(
        self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict
    ) -> None:
        """Start a checkpoint of step; with async_save this returns once the state is staged."""
        self.wait()  # one save in flight at a time
        began = time.perf_counter()
        tmp = catalog.staging_path(self.fs, self.root, step)
        if self.rank == 0:
            catalog.prepare_staging(self.fs, self.root, step)
            self.fs.makedirs(tmp, exist_ok=True)
            meta = {"step": step, "world_size": self.world_size, "saved_at": time.time(), **extra}
            self.fs.pipe_file(join(tmp, TRAINER_STATE), json.dumps(meta, indent=1).encode())
        dist.barrier(group=self._ctrl)
        buf = io.BytesIO()
        torch.save(capture_rng(), buf)
        self.fs.makedirs(join(tmp, "rng"), exist_ok=True)
        self.fs.pipe_file(join(tmp, _rng_file(self.rank)), buf.getvalue())

        model_sd, optim_sd = get_state_dict(model, optimizer)
        sd = {"model": model_sd, "optim": optim_sd}
        writer = FsspecWriter(self._url(tmp))
        if self.async_save:
            written = dcp.async_save(sd, storage_writer=writer, process_group=self._async_pg)
        else:
            dcp.save(sd, storage_writer=writer)
            written = Future()
            written.set_result(None)
        hashed = self._worker.submit(self._hash_own_files, written, tmp)
        self._pending = PendingSave(step, tmp, hashed, began)
        if not self.async_save:
            self.wait()
        # What the train loop waited for: staging when async, the whole commit when not.
        self.last_save_blocking_s = time.perf_counter() - began

    def _hash_own_files(self, written: Future, tmp: str) -> list[FileEntry]:
        """Hash what this rank wrote (its DCP shard files and its RNG state), off the train loop."""
        written.result()
        shard_prefix = f"__{self.rank}_"
        own = [n.rsplit("/", 1)[-1] for n in self.fs.ls(tmp, detail=False)]
        own = [n for n in own if n.startswith(shard_prefix)] + [_rng_file(self.rank)]
        return [hash_file(self.fs, join(tmp, rel), rel) for rel in own]

    def poll(self) -> int | None:
        """At a step boundary: commit the save in flight if every rank has finished writing."""
        if self._pending is None:
            return None
        done = torch.tensor([int(self._pending.hashed.done())])
        dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self._ctrl)
        return self._commit() if done.item() else None

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if it is True on any: how all ranks agree to stop at one step."""
        vote = torch.tensor([int(flag)])
        dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self._ctrl)
        return bool(vote.item())

    def wait(self) -> int | None:
        """Block until the save in flight (if any) is committed."""
        return None if self._pending is None else self._commit()

    def _own_result(self, pending: PendingSave) -> list[FileEntry] | str:
        """This rank's hashed files, or why it has none: every rank must reach the gather."""
        try:
            return pending.hashed.result(timeout=self.timeout_s)
        except FutureTimeout:
            return f"not written after {self.timeout_s}s (trainer.collective_timeout_s)"
        except Exception as exc:  # reported to every rank by the gather below
            return f"{type(exc).__name__}: {exc}"

    def _commit(self) -> int:
        """All ranks: gather what each wrote; rank 0 writes the manifest last and renames."""
        pending, self._pending = self._pending, None
        gathered: list[list[FileEntry] | str | None] = [None] * self.world_size
        dist.all_gather_object(gathered, self._own_result(pending), group=self._ctrl)
        failed = {r: why for r, why in enumerate(gathered) if isinstance(why, str)}
        if failed:
            # Nothing is committed: the .tmp dir stays unlisted and is removed at the next start.
            raise CheckpointSaveFailed(pending.step, failed)
        if self.rank == 0:
            precomputed = {e.path: e for rank_entries in gathered for e in rank_entries}
            build_manifest(
                self.fs, pending.tmp_path, meta={"step": pending.step}, precomputed=precomputed
            )
            final = catalog.step_dir(self.root, pending.step)
            catalog.commit(self.fs, pending.tmp_path, final, check_hashes=False)
            for old in catalog.prune(self.fs, self.root, self.keep):
                log.info("pruned checkpoint step %d (keeping the last %d)", old, self.keep)
            elapsed = time.perf_counter() - pending.started
            self.last_commit_s = elapsed
            log.info("committed checkpoint step %d in %.2fs", pending.step, elapsed)
            if self.on_commit is not None:
                self.on_commit(pending.step, elapsed)
        dist.barrier(group=self._ctrl)
        return pending.step

    def close(self) -> None:
        self.wait()
        self._worker.shutdown()
