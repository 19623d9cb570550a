"""A rank: one Ray actor per device, running the recipe under torch.distributed."""

from __future__ import annotations

import importlib
import os
import socket
from typing import Any

import ray

from orchestrator.runtime.drain import MarkerDrain


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
    ) -> dict:
        """Train the run config as the controller stored it; it is never composed again here."""
        from omegaconf import OmegaConf

        # Ray already narrowed CUDA_VISIBLE_DEVICES to this actor's GPU, so it is device 0.
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK="0",
            WORLD_SIZE=str(world_size),
            MASTER_ADDR=master[0],
            MASTER_PORT=str(master[1]),
        )
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        cfg = OmegaConf.create(run_config)
        OmegaConf.set_struct(cfg, True)  # a key the recipe misspells fails, as it would composed
        recipe = importlib.import_module(cfg.recipe.module)
        result = recipe.train(cfg, drain=MarkerDrain(cfg.run_dir))
        # Plain values: the recipe's own result type would make the driver import the recipe
        # (and torch) just to read it, seconds on every attempt's end.
        return {"step": result.step, "drained": result.drained}
