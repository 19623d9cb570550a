"""One submission on a FakeCluster (tests/fake_cluster.py): the driver, its gang and the
recipe, simulated on the fleet's FakeClock, against real run files, catalog and fence."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from orchestrator import exit_codes
from orchestrator.backends import base
from orchestrator.backends.base import FAILED, PENDING, RUNNING, STOPPED, SUCCEEDED
from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.fence import read_fence
from orchestrator.checkpoint.manifest import build_manifest
from orchestrator.checkpoint.storage import join, open_root
from orchestrator.rundir import RunDir
from orchestrator.runtime.spec import AttemptSpec

if TYPE_CHECKING:
    from tests.fake_cluster import FakeCluster


def loss_at(step: int) -> float:
    """A function of the step alone: a resumed run's losses continue an uninterrupted one's."""
    return 1.0 + 5.0 * math.exp(-step / 50.0)


class FakeAttempt:
    """One submission on a FakeCluster: the driver, its gang and the recipe, simulated."""

    def __init__(self, cluster: FakeCluster, spec: AttemptSpec, sid: str, now: float) -> None:
        self.cluster, self.spec, self.submission_id = cluster, spec, sid
        self.run_dir = RunDir(spec.run_dir)
        try:  # as the real driver does; a run config it cannot read is the cluster's fault
            self.cfg, self.problem = self.run_dir.read_run_config(), None
        except Exception as exc:
            self.cfg, self.problem = {}, f"cannot read the run config in {spec.run_dir}: {exc}"
        self.status, self.exit_code, self.message = PENDING, None, ""
        self.submitted_at, self.started_at, self.ended_at = now, None, None
        self.reserved, self.step = False, 0  # reserved: it holds its devices on the cluster
        self.resumed_from: int | None = None  # the committed step it loaded; None: from scratch
        self.committed: list[int] = []
        self.log_lines: list[str] = []
        self.next_at: float | None = now + cluster.pending_s  # its next event
        self.reserve_deadline = now + cluster.pending_s + spec.reserve_timeout_s
        self.fail: tuple[int, int, str] | None = None  # (step, exit code, message)
        self.no_capacity = False  # set by FakeCluster.no_capacity()
        self._exit: tuple[str, int, str] | None = None  # how it ends once it acknowledged a drain
        self._metrics = None
        self._now = now  # the simulated time of what it is doing

    def __repr__(self) -> str:
        return f"FakeAttempt({self.submission_id} on {self.cluster.name}: {self.status})"

    @property
    def live(self) -> bool:
        return self.status not in base.TERMINAL

    @property
    def ckpt(self) -> dict[str, Any]:
        return self.cfg.get("checkpoint", {})

    def say(self, line: str) -> None:
        self.log_lines.append(f"spillway: {line}")

    def fail_at(self, step: int, exit_code: int = exit_codes.USER_ERROR, message: str = "") -> None:
        """Fail while training `step`: its metrics are not written, nothing is committed."""
        self.fail = (step, exit_code, message or f"RuntimeError: injected failure at step {step}")

    def die(self, exit_code: int = -9) -> None:
        """The driver killed now (-9), or a rank lost (exit_codes.RANK_LOST)."""
        with self.cluster.lock:
            if self.live:
                self._now = self.cluster.clock()
                self.end(FAILED, exit_code, f"killed after step {self.step}")

    # ---- the simulation --------------------------------------------------------------------

    def fire(self) -> None:
        """The attempt's next event, at next_at."""
        at = self._now = self.next_at
        self.next_at = None
        if self._exit is not None:
            return self.end(*self._exit)
        if self.status == PENDING:
            self.status, self.started_at = RUNNING, at
            self.say(f"job {self.spec.job_id} attempt {self.spec.attempt} on "
                     f"{self.spec.world_size} rank(s)")  # fmt: skip
        if self.reserved:
            self._train_step(at)
        else:
            self._reserve(at)

    def _reserve(self, at: float) -> None:
        if self.problem:
            return self.end(FAILED, exit_codes.BROKEN_ENVIRONMENT, self.problem)
        fits = self.cluster.devices - self.cluster.devices_used() >= self.spec.world_size
        if self.no_capacity or (not fits and at >= self.reserve_deadline):
            why = f"could not reserve {self.spec.world_size} x {self.spec.device_resource}"
            return self.end(FAILED, exit_codes.NO_CAPACITY, why)
        if not fits:
            self.next_at = min(self.reserve_deadline, at + self.cluster.step_s)
            return
        self.reserved = True
        try:
            self.fs, self.root = open_root(self.ckpt["storage"])
            self.fs.makedirs(self.root, exist_ok=True)
            catalog.remove_stale_tmp(self.fs, self.root)
            self.step = self._resume_step()
        except Exception as exc:  # storage, or a step the controller named that is not there
            return self.end(FAILED, exit_codes.INFRASTRUCTURE, f"{type(exc).__name__}: {exc}")
        if self.step:
            self.resumed_from = self.step
            self.say(f"resumed from step {self.step}")
        self._metrics = self.run_dir.metrics_writer(flush_every_s=0.0)
        if self.step >= self._stop_step():
            return self.end(SUCCEEDED, 0, "")
        self.next_at = at + self.cluster.step_s

    def _resume_step(self) -> int:
        """checkpoint.resume_step as the recipe reads it: null the newest committed, 0 from
        scratch, otherwise exactly that committed step (CheckpointNotFound if it is not)."""
        wanted = self.ckpt.get("resume_step")
        if wanted is None:
            found = catalog.latest_verified(self.fs, self.root, warn=self.say)
            return found[0] if found else 0
        if wanted:
            catalog.require_step(self.fs, self.root, wanted)
        return wanted

    def _stop_step(self) -> int:
        trainer = self.cfg.get("trainer", {})
        stop_at = trainer.get("stop_at_step")
        return min(trainer["max_steps"], stop_at) if stop_at else trainer["max_steps"]

    def _train_step(self, at: float) -> None:
        step = self.step + 1
        if self.fail is not None and self.fail[0] == step:
            return self.end(FAILED, self.fail[1], self.fail[2])
        self.step = step
        self._metrics.write({
            "step": step, "loss": loss_at(step), "lr": 1e-3, "time": at,
            "world_size": self.spec.world_size, "tokens_seen": step * 1024,
            "checkpoint_s": self.cluster.save_s if self.committed else None,
        })  # fmt: skip
        last = step >= self._stop_step()
        saved = step % self.ckpt.get("every_steps", 50) == 0 or last
        if saved and not self._commit(step, at):
            return
        reason = self.run_dir.drain_request()
        if reason is not None:
            if not saved and not self._commit(step, at):
                return
            self.run_dir.acknowledge_drain(step, reason)
            self._exit = (FAILED, exit_codes.DRAINED, f"drained after step {step} ({reason})")
            if self.cluster.exit_s <= 0:
                return self.end(*self._exit)
            self.next_at = at + self.cluster.exit_s
        elif last:
            self.end(SUCCEEDED, 0, "")
        else:
            self.next_at = at + self.cluster.step_s

    def _fenced(self) -> bool:
        """Whether the fence names a newer epoch than this attempt's; if so it has ended."""
        url, mine = self.ckpt.get("fence_url"), self.ckpt.get("epoch")
        newest = read_fence(url, None) if url else None  # the cluster's own storage: no options
        if newest is None or mine is None or newest <= mine:
            return False
        why = f"fenced: the job's epoch is {newest}, this attempt's {mine}; committing nothing"
        self.end(FAILED, exit_codes.FENCED, why)
        return True

    def _commit(self, step: int, at: float) -> bool:
        """Save and commit `step` as the Checkpointer does; False if the attempt ended."""
        epoch = self.ckpt.get("epoch")
        try:
            if self._fenced():
                return False
            fs, root = self.fs, self.root
            staging = catalog.prepare_staging(fs, root, step)
            fs.makedirs(staging, exist_ok=True)
            state = {"step": step, "world_size": self.spec.world_size, "saved_at": at,
                     "attempt": self.spec.attempt, "epoch": epoch}  # fmt: skip
            fs.pipe_file(join(staging, "trainer_state.json"), json.dumps(state).encode())
            fs.pipe_file(join(staging, "model.bin"), f"weights of step {step}\n".encode() * 32)
            build_manifest(fs, staging, meta={"step": step}, epoch=epoch)
            catalog.commit(fs, staging, catalog.step_dir(root, step), check_hashes=False)
            self.committed.append(step)
            self.say(f"committed checkpoint step {step}")
            if self.ckpt.get("fence_url") is None:  # a run by hand prunes; else the controller
                catalog.prune(fs, root, self.ckpt.get("keep", 2))
            self.run_dir.record_save(step, self.cluster.save_s)
            self._metrics.flush()
        except Exception as exc:  # storage failing under a healthy program: infrastructure
            why = f"checkpoint step {step} was not committed: {type(exc).__name__}: {exc}"
            self.end(FAILED, exit_codes.INFRASTRUCTURE, why)
            return False
        return True

    def end(self, status: str, code: int | None, line: str) -> None:
        """Ended, with the exit code and message the Ray Jobs API would report."""
        if line:
            self.say(line)
        self.status, self.exit_code, self.next_at = status, code, None
        self.ended_at, self.reserved = self._now, False
        if status == SUCCEEDED:
            self.message = "Job finished successfully."
        elif status == STOPPED:
            self.message = "Job was intentionally stopped."
        else:
            tail = "\n".join(self.log_lines[-5:])
            self.message = f"Job entrypoint command failed with exit code {code}:\n{tail}"
        self.close()
        self.cluster.changed.notify_all()

    def shift(self, seconds: float) -> None:
        """Stand still for `seconds` (the cluster hung or refused): its deadlines move too."""
        if self.next_at is not None:
            self.next_at += seconds
        self.reserve_deadline += seconds

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
