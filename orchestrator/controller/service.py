"""The controller as a detached Ray actor on the home cluster.

Detached, so it outlives whatever started it; max_restarts=-1, so Ray brings it back if its
process dies, and the new one reloads the SQLite state and reattaches to running attempts.
It is started from inside the home cluster by a small bootstrap Ray job, submitted over HTTP
with the home cluster's token, so no CLI process ever has to join a Ray cluster.

    SPILLWAY_HOME=... SPILLWAY_FLEET='{...}' python -m orchestrator.controller.service
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

from omegaconf import OmegaConf

from orchestrator.controller.controller import Controller

NAMESPACE = "spillway"
POLL_S = 1.0
FLEET_ENV = "SPILLWAY_FLEET"

log = logging.getLogger("spillway.controller")


def actor_name(fleet_name: str) -> str:
    return f"spillway-controller-{fleet_name}"


class ControllerActor:
    def __init__(self, state_dir: str, fleet_cfg: dict, poll_s: float = POLL_S) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        self.controller = Controller(state_dir, OmegaConf.create(fleet_cfg))
        self.name = actor_name(fleet_cfg["name"])
        self.poll_s = poll_s
        self.started_at = time.time()
        threading.Thread(target=self._loop, name="reconcile", daemon=True).start()
        log.info("controller %s up (pid %d), state in %s", self.name, os.getpid(), state_dir)

    def _loop(self) -> None:
        while True:
            now = time.time()
            try:
                self.controller.reconcile(now)
                self.controller.state.heartbeat(self.name, os.getpid(), self.started_at, now)
            except Exception:
                log.exception("reconcile failed; retrying")
            time.sleep(self.poll_s)

    def info(self) -> dict:
        return {"pid": os.getpid(), "started_at": self.started_at}


def bootstrap() -> None:
    """Inside a Ray job on the home cluster: get or create the controller actor, then leave."""
    import ray

    state_dir = os.environ["SPILLWAY_HOME"]
    fleet_cfg = json.loads(os.environ[FLEET_ENV])
    ray.init(address="auto", namespace=NAMESPACE)
    actor = (
        ray.remote(ControllerActor)
        .options(
            name=actor_name(fleet_cfg["name"]),
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            num_cpus=0,
            runtime_env={"env_vars": {"SPILLWAY_HOME": state_dir}},
        )
        .remote(state_dir, fleet_cfg)
    )
    print(json.dumps(ray.get(actor.info.remote(), timeout=120)))


if __name__ == "__main__":
    bootstrap()
