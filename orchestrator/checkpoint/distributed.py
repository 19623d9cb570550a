"""Committed checkpoints of a sharded model and optimizer, through torch.distributed.checkpoint.

DCP writes one file per rank plus `.metadata`, in a layout any world size can load: resharding
happens on load. Around it runs the commit protocol of catalog.py: everything goes into
`step-N.tmp/` (on an object store, `step-N/`), each rank hashes the files it wrote, rank 0 writes
the manifest last and, on a local disk, renames.
Rank 0 alone picks the checkpoint to load and tells the others, so every rank resumes the same
step even if a listing or a verification would differ between them.

Fencing: an attempt started by the controller has an epoch and a fence file (fence.py). Before
each save, each commit and the start-up cleanup, rank 0 reads the fence and tells the others
what it found; a newer epoch there means every rank raises Fenced, having written no manifest and
deleted nothing. Such an attempt never prunes: its controller does. A run by hand (no fence)
prunes its own folder after each commit. A checkpoint may come back from a partner, so nothing
in it that this module reads is unpickled: RNG state is tensors (rng.py), trainer state is JSON.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.fence import Fenced, read_fence
from orchestrator.checkpoint.hashing_writer import HashingFsspecWriter
from orchestrator.checkpoint.manifest import CheckpointInvalid, FileEntry, build_manifest, hash_file
from orchestrator.checkpoint.rng import capture_rng, restore_rng, rng_from_bytes, rng_to_bytes
from orchestrator.checkpoint.staging import StagingBuffers
from orchestrator.checkpoint.storage import join, open_root

log = logging.getLogger("spillway.checkpoint")

TRAINER_STATE = "trainer_state.json"

# The longest rank 0 waits for the fence; well inside any collective timeout, so the other ranks
# hear rank 0's verdict (or its error) before their broadcast gives up.
FENCE_TIMEOUT_S = 30.0

T = TypeVar("T")


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


def _outcome_of(exc: BaseException) -> tuple[str, Any, str]:
    """What the other ranks need to raise the same kind of error rank 0 raised."""
    if isinstance(exc, Fenced):
        return ("fenced", exc.fence_epoch, str(exc))
    if isinstance(exc, catalog.CheckpointNotFound):
        return ("not_found", None, str(exc))
    if isinstance(exc, OSError):
        return ("os_error", None, str(exc))
    return ("error", None, f"{type(exc).__name__}: {exc}")


def _raise_outcome(kind: str, value: Any, message: str, epoch: int | None) -> None:
    if kind == "fenced":
        raise Fenced(epoch if epoch is not None else -1, value)
    if kind == "not_found":
        raise catalog.CheckpointNotFound(message)
    if kind == "os_error":
        raise OSError(f"on rank 0: {message}")
    raise RuntimeError(f"on rank 0: {message}")


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
        *,
        storage_options: dict[str, Any] | None = None,
        epoch: int | None = None,
        fence_url: str | None = None,
    ) -> None:
        if fence_url is not None and epoch is None:
            raise ValueError("checkpoint.fence_url needs checkpoint.epoch: whose fence is it?")
        self.url = url
        # Called on rank 0 with (step, seconds from the save's start) once a step is committed.
        self.on_commit = on_commit
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = open_root(url, self.storage_options)
        self.keep = keep
        self.async_save = async_save
        self.verify_hashes = verify_hashes
        self.timeout_s = timeout_s
        # The committing attempt's epoch, recorded in each manifest; with fence_url, checked
        # against the job's fence before anything is committed or deleted.
        self.epoch = epoch
        self.fence_url = fence_url
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        timeout = timedelta(seconds=timeout_s)
        # Small control messages go over gloo whatever the training backend; async saves get a
        # group of their own, since its collectives run on a background thread.
        self._ctrl = dist.new_group(backend="gloo", timeout=timeout)
        self._async_pg = dist.new_group(backend="gloo", timeout=timeout) if async_save else None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-write")
        # An async save copies the state into host buffers kept from one save to the next, and
        # plans its write once: DCP reuses a plan that has not changed instead of gathering
        # every rank's again. DCP keys its cached plans in class attributes: one key per
        # Checkpointer, so two in one process (a benchmark's) never share plans.
        self._buffers = StagingBuffers(torch.cuda.is_available()) if async_save else None
        self._planner = DefaultSavePlanner(enable_plan_caching=True) if async_save else None
        if self._planner is not None:
            self._planner._cached_plans_key = f"spillway-{id(self)}"
        self._pending: PendingSave | None = None
        self.last_save_blocking_s = 0.0
        # Start of the last committed save to its commit, on rank 0: what a drain's save costs.
        self.last_commit_s: float | None = None

        def start() -> None:
            self._check_fence()  # a stale attempt must not even clear debris
            self.fs.makedirs(self.root, exist_ok=True)
            for name in catalog.remove_stale_tmp(self.fs, self.root):
                log.warning("removed %s: an unfinished save, never committed", name)

        self._on_rank0(start)

    @property
    def control_group(self) -> dist.ProcessGroup:
        """The gloo group for small control messages: the step boundary's flags use it too."""
        return self._ctrl

    def _url(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    def _on_rank0(self, work: Callable[[], T], group: dist.ProcessGroup | None = None) -> T:
        """Run ``work`` on rank 0 alone and give every rank its outcome: the value it returned,
        or the same kind of error (Fenced, CheckpointNotFound, OSError), so no rank is left
        waiting in a collective for a rank 0 that has already raised."""
        outcome: list[Any] = [None]
        error: BaseException | None = None
        if self.rank == 0:
            try:
                outcome = [("ok", work(), "")]
            except Exception as exc:
                error = exc
                outcome = [_outcome_of(exc)]
        dist.broadcast_object_list(outcome, src=0, group=group or self._ctrl)
        kind, value, message = outcome[0]
        if kind == "ok":
            return value
        if error is not None:
            raise error
        _raise_outcome(kind, value, message, self.epoch)
        raise AssertionError("unreachable")

    def _check_fence(self) -> None:
        """On rank 0: Fenced if the job's fence names a newer epoch than this attempt's."""
        if self.fence_url is None:
            return  # a run by hand: nobody else commits here
        timeout_s = min(FENCE_TIMEOUT_S, self.timeout_s / 2)
        found = read_fence(self.fence_url, self.storage_options, timeout_s=timeout_s)
        if found is not None and found > self.epoch:
            raise Fenced(self.epoch, found)

    # ---- finding and loading -------------------------------------------------------------

    def latest_step(self) -> int | None:
        """The newest checkpoint that verifies, as chosen by rank 0 and agreed by all ranks."""

        def find() -> int | None:
            found = catalog.latest_verified(
                self.fs, self.root, warn=log.warning, check_hashes=self.verify_hashes
            )
            return found[0] if found else None

        return self._on_rank0(find)

    def resume_step(self, requested: int | None, verified: bool = False) -> int | None:
        """The step to resume from, agreed by all ranks (checkpoint.resume_step).

        None: the newest committed step that verifies (a run by hand). 0: none, from scratch,
        whatever the storage holds. N: exactly step N, or CheckpointNotFound naming the step and
        the storage URL; never another step, so a zombie's newer step beside it is not taken.
        ``verified``: the controller's copy checked step N's every byte as it landed here, so
        its files' presence and sizes are checked, not their hashes a second time.
        """
        if requested is None:
            return self.latest_step()
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
            raise ValueError(f"checkpoint.resume_step must be null or >= 0, got {requested!r}")
        if requested == 0:
            return None

        def find() -> int:
            hashes = self.verify_hashes and not verified
            catalog.require_step(self.fs, self.root, requested, check_hashes=hashes)
            return requested

        return self._on_rank0(find)

    def read_state(self, step: int, expect: Mapping[str, type] | None = None) -> dict:
        """The trainer state saved with step: small, read before any tensor is loaded.

        JSON only, parsed with json: a state file that is anything else (a pickle, say) is
        refused with CheckpointInvalid, never unpickled; so is one whose keys named in
        ``expect`` do not hold values of those types."""
        path = catalog.step_dir(self.root, step)
        raw = self.fs.cat_file(join(path, TRAINER_STATE))
        try:
            state = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointInvalid(path, TRAINER_STATE, f"is not JSON ({e})") from None
        if not isinstance(state, dict):
            raise CheckpointInvalid(path, TRAINER_STATE, "is not a JSON object")
        for key in ("step", "world_size"):
            value = state.get(key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise CheckpointInvalid(path, TRAINER_STATE, f"has no integer {key!r}")
        if state["step"] != step:
            raise CheckpointInvalid(path, TRAINER_STATE, f"is the state of step {state['step']}")
        for key, kind in (expect or {}).items():
            value = state.get(key)
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                raise CheckpointInvalid(path, TRAINER_STATE, f"has no {kind.__name__} {key!r}")
        return state

    def check_like(self, step: int, key: str, saved: object, own: Mapping[str, Any]) -> None:
        """CheckpointInvalid unless ``saved`` (the trainer state's ``key``) has exactly the keys
        of ``own`` with values of the same types: what a state_dict loader that copies every
        key onto its object (LambdaLR's does) may be given from a partner's checkpoint."""
        path = catalog.step_dir(self.root, step)
        if not isinstance(saved, dict):
            raise CheckpointInvalid(path, TRAINER_STATE, f"has no object {key!r}")
        odd = set(saved) ^ set(own)
        odd |= {k for k in set(saved) & set(own) if type(saved[k]) is not type(own[k])}
        if odd:
            raise CheckpointInvalid(
                path, TRAINER_STATE, f"has a {key!r} with unexpected keys {sorted(odd)}"
            )

    def _read_own_rng(self, path: str, same_world: bool) -> dict | tuple[str, str] | None:
        """This rank's RNG state in the checkpoint, None if it is not to be restored, or (file,
        why it is refused): every rank must reach the gather that follows."""
        rel = _rng_file(self.rank)
        rng_path = join(path, rel)
        if not same_world or not self.fs.exists(rng_path):
            return None
        try:
            return rng_from_bytes(self.fs.cat_file(rng_path))
        except ValueError as e:
            return (rel, str(e))

    def load(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        """Load step into the (sharded) model and optimizer, resharding to this world size.

        Returns whether this rank's RNG state was restored: per-rank streams only mean the same
        thing on the same number of ranks, so on another world size the caller reseeds.
        """
        path = catalog.step_dir(self.root, step)
        same_world = self.read_state(step)["world_size"] == self.world_size
        rng = self._read_own_rng(path, same_world)
        refused: list[Any] = [None] * self.world_size
        dist.all_gather_object(refused, rng if isinstance(rng, tuple) else None, group=self._ctrl)
        reasons = [why for why in refused if why is not None]
        if reasons:
            # Every rank refuses the same checkpoint, before any tensor is loaded.
            raise CheckpointInvalid(path, *reasons[0])
        model_sd, optim_sd = get_state_dict(model, optimizer)
        sd = {"model": model_sd, "optim": optim_sd}
        # dcp.load unpickles DCP's own `.metadata` (its tensor data it reads with
        # weights_only=True). It only ever reads this cluster's storage: a checkpoint from a
        # partner reaches it through transfer.copy_checkpoint, which checks the manifest against
        # the digest recorded when the step was committed and every byte against that manifest.
        reader = FsspecReader(self._url(path), **self.storage_options)
        dcp.load(sd, storage_reader=reader)
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        if isinstance(rng, dict):
            restore_rng(rng)
            return True
        return False

    # ---- saving --------------------------------------------------------------------------

    def save(
        self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict
    ) -> None:
        """Start a checkpoint of step; with async_save this returns once the state is staged.

        A sync save (the drain's) checks the fence, writes, hashes and commits before it
        returns, and raises Fenced, writing nothing, if a newer attempt owns the storage (on an
        object store staging clears debris in the step's dir, which may be the newer attempt's
        save). An async save only copies the state into host buffers it keeps from save to save
        (staging.py); the fence check, the files, DCP's write with a plan cached across saves,
        and the hashing run on a background thread, and what they raise (Fenced included)
        reaches every rank at the commit."""
        self.wait()  # one save in flight at a time
        began = time.perf_counter()
        tmp = catalog.staging_path(self.fs, self.root, step)
        meta = {"step": step, "world_size": self.world_size, "saved_at": time.time(), **extra}
        state = json.dumps(meta, indent=1).encode()
        rng = rng_to_bytes(capture_rng())
        model_sd, optim_sd = get_state_dict(model, optimizer)
        sd = {"model": model_sd, "optim": optim_sd}
        if self._buffers is not None:
            staged = self._buffers.stage(sd)
            hashed = self._worker.submit(self._write, step, tmp, state, rng, staged, True)
        else:
            hashed = Future()
            hashed.set_result(self._write(step, tmp, state, rng, sd, False))
        self._pending = PendingSave(step, tmp, hashed, began)
        if not self.async_save:
            self.wait()
        # What the train loop waited for: staging when async, the whole commit when not.
        self.last_save_blocking_s = time.perf_counter() - began

    def _write(
        self, step: int, tmp: str, state: bytes, rng: bytes, sd: dict, background: bool
    ) -> list[FileEntry]:
        """Stage step's directory (rank 0, after the fence), write every rank's files into it,
        and return this rank's hashed entries. In the background its collectives use a group of
        their own, never the one the train loop is using at the same time."""
        group = self._async_pg if background else self._ctrl

        def stage() -> None:
            self._check_fence()
            if self.fence_url is not None:  # the fence just said this epoch is the newest
                catalog.remove_superseded(self.fs, self.root, step, self.epoch, warn=log.warning)
            catalog.prepare_staging(self.fs, self.root, step)
            self.fs.makedirs(tmp, exist_ok=True)
            self.fs.pipe_file(join(tmp, TRAINER_STATE), state)

        self._on_rank0(stage, group=group)
        self.fs.makedirs(join(tmp, "rng"), exist_ok=True)
        self.fs.pipe_file(join(tmp, _rng_file(self.rank)), rng)
        # Hashes each file as DCP writes it: no rank reads its shards back (hashing_writer.py).
        writer = HashingFsspecWriter(self._url(tmp), **self.storage_options)
        planner = self._planner if background else None  # the drain's save plans afresh
        dcp.save(sd, storage_writer=writer, planner=planner, process_group=group)
        return self._hash_own_files(tmp, writer)

    def _hash_own_files(self, tmp: str, writer: HashingFsspecWriter) -> list[FileEntry]:
        """What this rank wrote (its DCP shard files, on the coordinator ``.metadata``, and its
        RNG state) with sizes and hashes, off the train loop: as ``writer`` hashed them while
        writing; a file it has no hash for (the RNG state, or all of them when DCP ran the
        writer in another process) is read back and hashed."""
        streamed = writer.entries()
        shard_prefix = f"__{self.rank}_"
        own = [n.rsplit("/", 1)[-1] for n in self.fs.ls(tmp, detail=False)]
        own = [n for n in own if n.startswith(shard_prefix)] + [_rng_file(self.rank)]
        own += [rel for rel in streamed if rel not in own]  # the coordinator's .metadata
        return [streamed.get(rel) or hash_file(self.fs, join(tmp, rel), rel) for rel in own]

    def writing(self) -> bool:
        """Whether this rank is still writing (or hashing) the save in flight: its part of the
        step boundary's one all-reduce (recipes.common.boundary)."""
        return self._pending is not None and not self._pending.hashed.done()

    def commit_if_written(self, saves_written: bool) -> int | None:
        """At a step boundary, once every rank agreed that none is still writing: commit the
        save in flight, if there is one. Every rank saves at the same steps, so every rank has
        the same save in flight and all of them reach the commit's collectives together."""
        if self._pending is None or not saves_written:
            return None
        return self._commit()

    def wait(self) -> int | None:
        """Block until the save in flight (if any) is committed."""
        return None if self._pending is None else self._commit()

    def _own_result(self, pending: PendingSave) -> list[FileEntry] | str | tuple[str, int]:
        """This rank's hashed files, or why it has none: every rank must reach the gather."""
        try:
            return pending.hashed.result(timeout=self.timeout_s)
        except FutureTimeout:
            return f"not written after {self.timeout_s}s (trainer.collective_timeout_s)"
        except Fenced as exc:  # every rank heard the same verdict from rank 0
            return ("fenced", exc.fence_epoch)
        except Exception as exc:  # reported to every rank by the gather below
            return f"{type(exc).__name__}: {exc}"

    def _commit(self) -> int:
        """All ranks: gather what each wrote; rank 0 checks the fence, writes the manifest last,
        renames, and (a run by hand) prunes; every rank then hears how that went."""
        pending, self._pending = self._pending, None
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, self._own_result(pending), group=self._ctrl)
        fenced = [g[1] for g in gathered if isinstance(g, tuple)]
        if fenced:
            # A background save found a newer epoch in the fence: it wrote and deleted nothing.
            raise Fenced(self.epoch if self.epoch is not None else -1, fenced[0])
        failed = {r: why for r, why in enumerate(gathered) if isinstance(why, str)}
        if failed:
            # Nothing is committed: the .tmp dir stays unlisted and is removed at the next start.
            raise CheckpointSaveFailed(pending.step, failed)

        def publish() -> None:
            # Fenced here leaves the staged files without a manifest: the catalog never lists
            # them, and deleting them could delete what the newer attempt is writing there.
            self._check_fence()
            precomputed = {e.path: e for rank_entries in gathered for e in rank_entries}
            build_manifest(
                self.fs,
                pending.tmp_path,
                meta={"step": pending.step},
                precomputed=precomputed,
                epoch=self.epoch,
            )
            final = catalog.step_dir(self.root, pending.step)
            catalog.commit(self.fs, pending.tmp_path, final, check_hashes=False)
            elapsed = time.perf_counter() - pending.started
            self.last_commit_s = elapsed
            log.info("committed checkpoint step %d in %.2fs", pending.step, elapsed)
            if self.on_commit is not None:
                self.on_commit(pending.step, elapsed)
            if self.fence_url is not None:
                # Under a controller, the controller prunes (controller/retention.py): it knows
                # the job's epoch for certain, where a partitioned attempt that has not yet seen
                # the fence would delete the very step the next attempt is told to resume.
                return
            for old in catalog.prune(self.fs, self.root, self.keep):
                log.info("pruned checkpoint step %d (keeping the last %d)", old, self.keep)

        self._on_rank0(publish)
        return pending.step

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._worker.shutdown()
