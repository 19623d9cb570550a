"""The controller as a detached Ray actor on the home cluster's head: the reconcile loop and the
HTTP API (orchestrator.api.server) in one process, where the SQLite state dir is.

Detached, so it outlives whatever started it; max_restarts=-1, so Ray brings it back if its
process dies, and the new one reloads the SQLite state, reattaches to running attempts and
listens on the same port again. It is pinned to the head node (the node the bootstrap job's
driver runs on, which the Jobs API puts on the head), so a restart finds its state dir. It is
started by a small bootstrap Ray job, submitted over HTTP with the home cluster's token, so no
CLI process ever has to join a Ray cluster; after that the CLI talks to its API only.

    SPILLWAY_HOME=... SPILLWAY_FLEET='{...}' python -m orchestrator.api.service

This module is the composition root of the controller's process: it alone wires the API
server to the controller.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

from omegaconf import DictConfig

from orchestrator.api.protocol import FLEET_ENV
from orchestrator.api.server import ApiServer
from orchestrator.config import spillway_home
from orchestrator.config.compose import ensure_state_dir
from orchestrator.controller.controller import Controller
from orchestrator.fleet.checks import controller_fleet
from orchestrator.fleet.tokens import read_token

NAMESPACE = "spillway"
POLL_S = 1.0
# The loop's period while an attempt that acknowledged its drain is exiting (Controller.hurried).
HURRIED_POLL_S = 0.2

__all__ = ["FLEET_ENV", "NAMESPACE", "POLL_S", "ControllerActor", "actor_name", "bootstrap"]

log = logging.getLogger("spillway.controller")


def actor_name(fleet_name: str) -> str:
    return f"spillway-controller-{fleet_name}"


def api_address(fleet: DictConfig) -> tuple[str, int, str]:
    """(host, port, token) the API serves on; RuntimeError naming the key when one is missing."""
    c = fleet.controller
    if c.port is None:
        raise RuntimeError(
            "fleet.controller.port is not set: the controller needs a port for its API "
            "(the local fleet picks one at launch)"
        )
    token = read_token(c.token_path, c.token_env)
    if not token:
        raise RuntimeError(
            f"fleet.controller: no API token (token_path={c.token_path}, token_env={c.token_env}); "
            "the API never serves unauthenticated"
        )
    return c.host, int(c.port), token


class ControllerActor:
    def __init__(self, state_dir: str, fleet_cfg: dict, poll_s: float = POLL_S) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        # The same check the CLI makes, and the sources only this machine can read: a fleet
        # the CLI would refuse never starts a loop that would trip on it every tick.
        fleet = controller_fleet(fleet_cfg)
        host, port, token = api_address(fleet)
        ensure_state_dir(state_dir)
        self.controller = Controller(state_dir, fleet)
        self.name = actor_name(fleet.name)
        self.poll_s = poll_s
        self.started_at = time.time()
        # A request that adds or changes work sets this, so the loop runs now, not next tick.
        self._wake = threading.Event()
        self.controller.wake = self._wake.set
        self._stopping = threading.Event()
        self.api = ApiServer(
            self.controller,
            token,
            host,
            port,
            wake=self._wake.set,
            health={"fleet": fleet.name, "pid": os.getpid(), "started_at": self.started_at},
        )
        self.api.start()  # a port we cannot take fails the actor here, before any reconcile
        self._thread = threading.Thread(target=self._loop, name="reconcile", daemon=True)
        self._thread.start()
        # Apart from the loop: a tick stuck on a cluster must not make the controller look dead.
        self._beat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        self._beat.start()
        log.info(
            "controller %s up (pid %d), state in %s, API on %s",
            self.name,
            os.getpid(),
            state_dir,
            self.api.url,
        )

    def _loop(self) -> None:
        while not self._stopping.is_set():
            # Cleared before the tick: a request that lands during it gets another tick at once.
            self._wake.clear()
            try:
                self.controller.reconcile(time.time())
            except Exception:
                log.exception("reconcile failed; retrying")
            hurried = self.controller.hurried()
            self._wake.wait(min(self.poll_s, HURRIED_POLL_S) if hurried else self.poll_s)

    def _heartbeat(self) -> None:
        while not self._stopping.is_set():
            try:
                self.controller.state.heartbeat(
                    self.name, os.getpid(), self.started_at, time.time()
                )
            except Exception:
                log.exception("heartbeat failed; retrying")
            self._stopping.wait(self.poll_s)

    def info(self) -> dict:
        return {"pid": os.getpid(), "started_at": self.started_at, "url": self.api.url}

    def close(self) -> None:
        """Stop the loop and the API (tests; Ray simply kills the process)."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self._beat.join(timeout=5)
        self.api.stop()
        self.controller.close()


def bootstrap() -> None:
    """Inside a Ray job on the home head: get or create the controller actor, then leave."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # A remote head keeps its own state dir (its SPILLWAY_HOME, else ~/.spillway).
    state_dir = spillway_home()
    fleet_cfg = json.loads(os.environ[FLEET_ENV])
    ray.init(address="auto", namespace=NAMESPACE)
    # The Jobs API runs this driver on the head: pin the actor (and its restarts) to it.
    head = ray.get_runtime_context().get_node_id()
    env = {"SPILLWAY_HOME": state_dir}
    token_env = (fleet_cfg.get("controller") or {}).get("token_env")
    if token_env and os.environ.get(token_env):
        env[token_env] = os.environ[token_env]  # the API's token, when it comes from a variable
    actor = (
        ray.remote(ControllerActor)
        .options(
            name=actor_name(fleet_cfg["name"]),
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=head, soft=False),
            runtime_env={"env_vars": env},
        )
        .remote(state_dir, fleet_cfg)
    )
    print(json.dumps(ray.get(actor.info.remote(), timeout=120)))


if __name__ == "__main__":
    bootstrap()
