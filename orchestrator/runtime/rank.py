"""A rank: one Ray actor per device, running the recipe under torch.distributed.

A recipe's exception never leaves the actor as a RayTaskError: the rank classifies it where
its traceback still is (orchestrator.runtime.failures) and returns a plain result, so the
driver tells a storage hiccup from a bug. A rank whose process died still reaches the driver
as a RayActorError.
"""

from __future__ import annotations

import importlib
import os
import socket
from typing import Any

import ray

from orchestrator.runtime.drain import MarkerDrain
from orchestrator.runtime.failures import failure_report


def train_rank(
    rank: int, world_size: int, master: tuple[str, int], run_config: dict[str, Any]
) -> dict[str, Any]:
    """Train the run config as the controller stored it (never composed again here) as one
    rank of `world_size`. Returns {"step", "drained", "fenced", "failed"}: "failed" is None, or
    failures.failure_report's {"code", "kind", "message", "traceback", "peer"}."""
    # Ray already narrowed CUDA_VISIBLE_DEVICES to this actor's GPU, so it is device 0.
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK="0",
        WORLD_SIZE=str(world_size),
        MASTER_ADDR=master[0],
        MASTER_PORT=str(master[1]),
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        from omegaconf import OmegaConf

        cfg = OmegaConf.create(run_config)
        OmegaConf.set_struct(cfg, True)  # a key the recipe misspells fails, as it would composed
        recipe = importlib.import_module(cfg.recipe.module)
        drain = MarkerDrain(cfg.run_dir, rank)
        try:
            result = recipe.train(cfg, drain=drain)
        finally:
            drain.close()
    except (Exception, SystemExit) as exc:  # SystemExit: a recipe that stops itself with a message
        return {"step": None, "drained": False, "fenced": False, "failed": failure_report(exc)}
    # Plain values: the recipe's own result type would make the driver import the recipe
    # (and torch) just to read it, seconds on every attempt's end.
    return {
        "step": result.step,
        "drained": bool(result.drained),
        "fenced": bool(getattr(result, "fenced", False)),
        "failed": None,
    }


@ray.remote(max_restarts=0)
class RankActor:
    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a free port: rank 0's becomes MASTER_ADDR:MASTER_PORT."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def environment_problem(self, requirements: list[str]) -> str | None:
        """What this node's Python lacks, naming the node; None when it has it all. The driver
        checked its own node; a gang across nodes must check each of them."""
        from orchestrator.runtime.requirements import check

        problem = check(requirements)
        return None if problem is None else f"node {ray.util.get_node_ip_address()}: {problem}"

    def run(
        self, rank: int, world_size: int, master: tuple[str, int], run_config: dict[str, Any]
    ) -> dict[str, Any]:
        return train_rank(rank, world_size, master, run_config)
