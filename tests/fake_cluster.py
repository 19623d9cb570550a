"""An in-memory fleet behind the backend interface, so the controller's unit tests run its
reconcile loop through every failure window in seconds, without Ray.

Only the clusters are fake. Storage is real: each cluster's storage root is a local directory,
and a fake attempt reads its run config, writes metrics, commits checkpoints, reads
the fence and acknowledges drains through the real RunDir, catalog and fence modules, where a
real attempt would, so the controller's observations, copies and catalogs meet real files.

Time is a FakeClock; attempts move only when it does: `fleet.advance(s)` runs them up to the new
time, event by event (`fleet.tick(controller)` advances, then reconciles once). An attempt is
PENDING for `pending_s` (its driver starting), then RUNNING: it reserves its gang (waiting while
the devices are taken; NO_CAPACITY after spec.reserve_timeout_s) and trains a step every
`step_s`, one metrics record each, committing every checkpoint.every_steps and at the last step
after reading the fence, and honouring a drain request after each step.

Scripted faults: on a FakeAttempt `fail_at`, `die`; on a FakeCluster `fail_at` and `no_capacity`
(for the next submit), `accept_then_time_out` (the next submit), `die` (every live attempt),
`refuse`, `hang`, `partition` and `heal`. Under refuse and hang the cluster's attempts stand
still (their deadlines shift by the time lost) and go on after heal; under partition they keep
training and committing: the zombie. `fleet.remove(name)` takes a cluster out of the fleet the
controller sees; it runs on. Every backend call and probe is recorded in `cluster.calls` as
(name, args), refused and timed-out ones too.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf

from orchestrator import exit_codes
from orchestrator.backends import base
from orchestrator.backends.base import STOPPED
from orchestrator.config.schema import FleetConfig
from orchestrator.fleet.fleet import ClusterView
from orchestrator.fleet.probe import ClusterHealth
from orchestrator.runtime.spec import AttemptSpec
from tests.fake_attempt import FakeAttempt, loss_at

__all__ = ["FakeAttempt", "FakeClock", "FakeCluster", "FakeFleet", "health", "loss_at"]

# Real seconds: how long follow_logs waits for news, and run_until for done().
FOLLOW_IDLE_S, RUN_UNTIL_REAL_S = 5.0, 60.0
_HEALTH_FIELDS = {f.name for f in dataclasses.fields(ClusterHealth)}


def health(reachable: bool, **fields: Any) -> ClusterHealth:
    """A ClusterHealth with whichever of these fields the dataclass has today."""
    return ClusterHealth(reachable, **{k: v for k, v in fields.items() if k in _HEALTH_FIELDS})


class Call(NamedTuple):
    name: str
    args: tuple


class FakeClock:
    """Simulated epoch seconds; advancing it runs whatever listens (the fleet's attempts)."""

    def __init__(self, start: float | None = None) -> None:
        # Near the wall clock by default: some run files (drain acks, saves) carry time.time().
        self.now = float(int(time.time())) if start is None else float(start)
        self.listeners: list[Callable[[float, float], None]] = []  # called with (before, now)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError(f"the clock only moves forward, not by {seconds}")
        before, self.now = self.now, self.now + seconds
        for fn in self.listeners:
            fn(before, self.now)
        return self.now


@dataclasses.dataclass(eq=False)
class FakeCluster:
    """A ClusterBackend (orchestrator.backends.base) in memory, with the cluster's probe.

    Times are simulated seconds (per step, before an attempt starts, reported per save), but
    hang_s is real: how long a hung call blocks before it times out."""

    name: str
    kind: str = "owned"
    devices: int = 2
    device_type: str = "cpu"
    cost_per_device_hour: float = 0.0
    lease_start: float | None = None
    lease_end: float | None = None
    step_s: float = 1.0
    pending_s: float = 1.0
    save_s: float = 0.5
    exit_s: float = 0.0  # from a drain's acknowledgement to the attempt's end
    hang_s: float = 0.2
    answer_s: float = 0.0  # real seconds an answering probe takes: a loaded machine's lag
    storage_root: str | None = None  # a FakeFleet gives it one under its root
    device_resource: str = "spillway_device"
    mode: str | None = None  # None, "refused", "hung" or "partitioned"
    lost_devices: int = 0  # a node gone: its probe counts this many devices fewer
    attempts: dict[str, FakeAttempt] = dataclasses.field(default_factory=dict, repr=False)
    calls: list[Call] = dataclasses.field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.dashboard_url = f"http://fake-{self.name}.invalid:8265"  # never contacted
        self.clock: Callable[[], float] = time.time  # the fleet's, once added to one
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self._next_submit: list[Callable[[FakeAttempt], None]] = []
        self._lose_next_answer = False

    def view(self) -> ClusterView:
        if self.storage_root is None:
            raise RuntimeError(f"cluster {self.name} has no storage root: add it to a FakeFleet")
        return ClusterView(
            name=self.name, kind=self.kind, local=False,
            address=f"fake-{self.name}.invalid:6379", dashboard_url=self.dashboard_url,
            token=None, device_type=self.device_type, devices=self.devices,
            device_resource=self.device_resource, storage_root=self.storage_root,
            cost_per_device_hour=self.cost_per_device_hour, lease_start=self.lease_start,
            lease_end=self.lease_end, running=True, storage_options={},
        )  # fmt: skip

    def live(self) -> list[FakeAttempt]:
        return [a for a in self.attempts.values() if a.live]

    def devices_used(self) -> int:
        return sum(a.spec.world_size for a in self.attempts.values() if a.reserved)

    def count(self, name: str, *args: Any) -> int:
        """Calls of `name` whose arguments begin with `args`, e.g. count("submit", sid)."""
        return sum(1 for c in self.calls if c.name == name and c.args[: len(args)] == args)

    def fail_at(self, step: int, exit_code: int = exit_codes.USER_ERROR, message: str = "") -> None:
        """The next attempt submitted here fails while training `step`."""
        self._next_submit.append(lambda a: a.fail_at(step, exit_code, message))

    def no_capacity(self) -> None:
        """The next attempt submitted here cannot reserve its gang (exit_codes.NO_CAPACITY)."""
        self._next_submit.append(lambda a: setattr(a, "no_capacity", True))

    def accept_then_time_out(self) -> None:
        """The next submit is accepted (the attempt runs) but its answer is lost: timed out."""
        self._lose_next_answer = True

    def die(self, exit_code: int = -9) -> None:
        for attempt in self.live():
            attempt.die(exit_code)

    def refuse(self) -> None:  # the head is gone: every call and probe refused at once
        self.mode = "refused"

    def hang(self) -> None:  # accepts, never answers: every call and probe times out
        self.mode = "hung"

    def partition(self) -> None:  # unreachable as when hung, yet its attempts train on
        self.mode = "partitioned"

    def heal(self) -> None:
        self.mode = None

    # ---- the backend -----------------------------------------------------------------------

    def _error(self, call: str, exc: str, **kind: bool) -> base.BackendError:
        text = f"{call} on {self.name} ({self.dashboard_url}) failed: {exc}"
        return base.BackendError(text, **kind)

    def _call(self, name: str, *args: Any) -> None:
        """Record the call; then fail it as the cluster's mode says."""
        with self.lock:
            self.calls.append(Call(name, args))
            mode = self.mode
        if mode == "refused":
            raise self._error(name, "ConnectionError: [Errno 111] Connection refused", refused=True)
        if mode in ("hung", "partitioned"):
            time.sleep(self.hang_s)
            raise self._error(name, f"ReadTimeout: timed out after {self.hang_s}s", timed_out=True)

    def _known(self, call: str, sid: str) -> FakeAttempt:
        if sid not in self.attempts:
            raise self._error(call, f"RuntimeError: status code 404: Job {sid} does not exist.")
        return self.attempts[sid]

    def submit(self, spec: AttemptSpec) -> str:
        sid = base.submission_id(spec.job_id, spec.attempt)
        self._call("submit", sid)
        with self.lock:
            if sid in self.attempts:
                already = f"RuntimeError: Job with submission_id {sid} already exists"
                raise self._error("submit", already)
            attempt = FakeAttempt(self, spec, sid, self.clock())
            scripts, self._next_submit = self._next_submit, []
            for script in scripts:
                script(attempt)
            self.attempts[sid] = attempt
            lost, self._lose_next_answer = self._lose_next_answer, False
        if lost:
            time.sleep(self.hang_s)
            raise self._error("submit", "ReadTimeout: read timed out", timed_out=True)
        return sid

    def info(self, sid: str) -> base.JobInfo:
        self._call("info", sid)
        with self.lock:
            found = self._known("job info", sid)
            return base.JobInfo(found.status, found.exit_code, found.message)

    def exists(self, sid: str) -> bool:
        self._call("exists", sid)
        return sid in self.attempts

    def list(self) -> list[str]:
        self._call("list")
        return list(self.attempts)

    def stop(self, sid: str) -> bool:
        self._call("stop", sid)
        with self.lock:
            found = self._known("stop", sid)
            if not found.live:
                return False
            found._now = self.clock()
            found.end(STOPPED, None, f"stopped after step {found.step}")
            return True

    def logs(self, sid: str) -> str:
        self._call("logs", sid)
        with self.lock:
            return "\n".join(self._known("logs", sid).log_lines)

    def follow_logs(self, sid: str) -> Iterator[str]:
        """The attempt's lines as the clock brings them, until it ends. Another thread must
        advance the clock; FOLLOW_IDLE_S real seconds without news is a timeout."""
        self._call("follow_logs", sid)
        with self.lock:
            found, sent = self._known("follow logs", sid), 0
        while True:
            with self.lock:
                lines, done = list(found.log_lines[sent:]), not found.live
                if not lines and not done:
                    if not self.changed.wait(FOLLOW_IDLE_S):
                        raise self._error("follow logs", "no news", timed_out=True)
                    continue
            sent += len(lines)
            yield from lines
            if done:
                return

    def probe(self) -> ClusterHealth:
        with self.lock:
            self.calls.append(Call("probe", ()))
            mode, used = self.mode, float(self.devices_used())
        time.sleep(self.answer_s if mode != "hung" and mode != "partitioned" else 0.0)
        if mode == "refused":
            refused = "unreachable: [Errno 111] Connection refused"
            return health(False, error=refused, failure="refused", refused=True)
        if mode in ("hung", "partitioned"):
            time.sleep(self.hang_s)
            return health(False, error="unreachable: timed out", failure="timeout", refused=False)
        return health(
            True, devices_used=used, devices_total=float(self.devices - self.lost_devices)
        )

    def advance(self, before: float, now: float) -> None:
        """Run this cluster's attempts from `before` to `now`, earliest event first."""
        with self.lock:
            if self.mode in ("refused", "hung"):
                for attempt in self.live():
                    attempt.shift(now - before)
                return
            while due := [a for a in self.live() if a.next_at is not None and a.next_at <= now]:
                min(due, key=lambda a: a.next_at).fire()
            self.changed.notify_all()


class FakeFleet:
    """A FakeClock and FakeClusters, seen by the controller as real ClusterViews over real
    storage under `root`. Pass `backend_for`, `probe`, `clock` and `fleet` to a Controller
    with `fleet_cfg`, or let `controller(state_dir)` do it."""

    def __init__(
        self,
        root: Path,
        clusters: Iterable[FakeCluster],
        lost_after_s: float = 10.0,
        start: float | None = None,
    ) -> None:
        self.root, self.name, self.lost_after_s = Path(root), "fake", lost_after_s
        self.clock = FakeClock(start)
        self.clock.listeners.append(self._simulate)
        self.clusters: dict[str, FakeCluster] = {}
        self.removed: set[str] = set()
        for cluster in clusters:
            self.add(cluster)

    def __getitem__(self, name: str) -> FakeCluster:
        return self.clusters[name]

    def __repr__(self) -> str:
        return f"FakeFleet(t={self.clock.now:.1f}, {', '.join(map(repr, self.attempts()))})"

    def add(self, cluster: FakeCluster) -> FakeCluster:
        if cluster.storage_root is None:
            path = self.root / "storage" / cluster.name
            path.mkdir(parents=True, exist_ok=True)
            cluster.storage_root = str(path)
        cluster.clock = self.clock
        self.clusters[cluster.name] = cluster
        self.removed.discard(cluster.name)
        return cluster

    def remove(self, name: str) -> None:
        """Out of the fleet (the views and fleet_cfg); the cluster itself runs on."""
        self.removed.add(name)

    def _simulate(self, before: float, now: float) -> None:
        for cluster in self.clusters.values():  # removed ones too: they still exist
            cluster.advance(before, now)

    def attempts(self) -> list[FakeAttempt]:
        return [a for c in self.clusters.values() for a in c.attempts.values()]

    def fleet(self) -> list[ClusterView]:
        return [c.view() for n, c in self.clusters.items() if n not in self.removed]

    def backend_for(self, view: ClusterView) -> FakeCluster:
        return self.clusters[view.name]

    def probe(self, view: ClusterView) -> ClusterHealth:
        return self.clusters[view.name].probe()

    @property
    def fleet_cfg(self) -> DictConfig:
        """The fleet config matching fleet() now (removed clusters left out)."""

        def iso(t: float | None) -> str | None:
            return None if t is None else datetime.fromtimestamp(t, tz=timezone.utc).isoformat()

        clusters = {
            c.name: {
                "kind": c.kind, "local": False, "address": f"fake-{c.name}.invalid:6379",
                "dashboard_url": c.dashboard_url, "device_type": c.device_type,
                "devices": c.devices, "device_resource": c.device_resource,
                "storage_root": c.storage_root, "cost_per_device_hour": c.cost_per_device_hour,
                "lease_start": iso(c.lease_start), "lease_end": iso(c.lease_end),
            }
            for c in self.clusters.values()
            if c.name not in self.removed
        }  # fmt: skip
        fleet = {"name": self.name, "lost_after_s": self.lost_after_s, "clusters": clusters}
        return OmegaConf.merge(OmegaConf.structured(FleetConfig), fleet)

    def controller(self, state_dir: str | Path):
        """A real Controller on `state_dir`, wired to this fleet."""
        from orchestrator.controller.controller import Controller  # imports the Ray backend

        return Controller(
            str(state_dir), self.fleet_cfg, backend_for=self.backend_for, probe=self.probe,
            clock=self.clock, fleet=self.fleet,
        )  # fmt: skip

    def restart(self, controller):
        """The controller killed (between any two of its writes) and started again: closed
        (its state, and its lanes where it has them), and a fresh one on the same state dir.
        Work of the old one still under way fails on its closed state, as in a dead process."""
        getattr(controller, "close", controller.state.close)()
        return self.controller(controller.state_dir)

    def advance(self, seconds: float) -> float:
        return self.clock.advance(seconds)

    def tick(self, controller, seconds: float = 1.0) -> float:
        """Time passes, then the controller reconciles once. Before the clock moves, the
        controller's probes of clusters that answer at once have landed: they take no
        simulated time, and a loaded machine running them late must not turn a blip into
        seconds of silence."""
        self.settle(controller)
        now = self.advance(seconds)
        controller.reconcile(now)
        return now

    def settle(self, controller, timeout_s: float = 30.0) -> None:
        lanes = getattr(controller, "lanes", None)
        if lanes is None:
            return
        for name, cluster in self.clusters.items():
            if cluster.mode in (None, "refused") and not lanes.wait(name, "observe", timeout_s):
                raise AssertionError(f"the probe of {name} did not end in {timeout_s:g}s")

    def run_until(
        self, controller, done: Callable[[], bool], max_s: float = 600.0, tick_s: float = 1.0
    ) -> float:
        """Tick until done() holds; AssertionError after max_s simulated seconds (or
        RUN_UNTIL_REAL_S real ones)."""
        began, deadline = self.clock.now, time.monotonic() + RUN_UNTIL_REAL_S
        while not done():
            if self.clock.now - began >= max_s or time.monotonic() > deadline:
                raise AssertionError(f"not done after {self.clock.now - began:g}s: {self}")
            self.tick(controller, tick_s)
        return self.clock.now

    def close(self) -> None:
        """Close every attempt's metrics spool (its temp file); attempts stay as they are."""
        for attempt in self.attempts():
            attempt.close()
