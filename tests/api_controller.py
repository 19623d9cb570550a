"""A real controller with its real HTTP API, in this process: for the API and CLI tests.

Its fleet's clusters are `local: true` but never started, so nothing is placed: jobs stay
PENDING, and every answer comes from the controller's own state and run files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from orchestrator.api.client import ApiClient, Endpoint
from orchestrator.api.service import ControllerActor
from orchestrator.config.schema import FleetConfig
from orchestrator.fleet.local import free_ports
from orchestrator.fleet.tokens import new_token_file


def fleet_config(root: Path, port: int, token_path: Path) -> dict:
    """A fleet named like the default one, but smaller: its partner has 2 devices, not 4. Both
    are owned: a leased local cluster that was never started has no lease window yet, which
    the controller's placement snapshot refuses."""
    fleet = OmegaConf.merge(
        OmegaConf.structured(FleetConfig),
        {
            "name": "local",
            "controller": {"host": "127.0.0.1", "port": port, "token_path": str(token_path)},
            "clusters": {
                "home": {"kind": "owned", "local": True, "devices": 2,
                         "storage_root": str(root / "storage" / "home")},
                "partner": {"kind": "owned", "local": True, "devices": 2,
                            "storage_root": str(root / "storage" / "partner")},
            },
        },
    )  # fmt: skip
    return OmegaConf.to_container(fleet)


@dataclass
class Running:
    actor: ControllerActor
    endpoint: Endpoint
    root: Path

    @property
    def url(self) -> str:
        return self.endpoint.url

    @property
    def token(self) -> str:
        return Path(self.endpoint.token_path).read_text()

    def client(self) -> ApiClient:
        return ApiClient(self.endpoint)

    def client_home(self, path: Path, **fields) -> Path:
        """A SPILLWAY_HOME holding only client.json (and a copy of the token beside it)."""
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        new_token_file(path / "token").write_text(self.token)  # 0600, as a user would keep it
        data = {"url": self.url, "token_path": str(path / "token"), **fields}
        (path / "client.json").write_text(json.dumps(data))
        return path


def start(root: Path, poll_s: float = 30.0) -> Running:
    """A controller whose loop ticks every poll_s unless a request wakes it."""
    root.mkdir(parents=True, exist_ok=True)
    token = new_token_file(root / "api-token")
    (port,) = free_ports(1)
    actor = ControllerActor(str(root / "state"), fleet_config(root, port, token), poll_s=poll_s)
    endpoint = Endpoint(url=actor.api.url, token_path=str(token), source="the test")
    return Running(actor, endpoint, root)
