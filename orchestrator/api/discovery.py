"""Where the CLI finds the controller, in this order:

1. `$SPILLWAY_HOME/client.json`: {"url": ..., "token_path": ... or "token_env": ...,
   "insecure_http": false, "fleet": NAME}. Enough on its own: a laptop holding only this file
   drives jobs. A file that names a fleet is skipped for a command that composed another one.
2. The fleet config's `fleet.controller.url` (or http://host:port), with its token_path or
   token_env: a remote home.
3. The local fleet's record, `$SPILLWAY_HOME/fleet/<fleet>/controller/api.json`: the port picked
   once on 127.0.0.1 and a token file beside it, made by the first `launch` or `fleet up` and
   reused after; the controller is bootstrapped with both in its fleet config.

`launch` and `fleet up` write client.json for the controller they found through 2 or 3, so
that every later command (status, logs, ...) needs no config at all. A client.json written by
hand (one without "fleet") is never overwritten.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from orchestrator.api.client import ApiError, Endpoint
from orchestrator.fleet.local import free_ports
from orchestrator.fleet.tokens import new_token_file

CLIENT_FILE = "client.json"
_CLIENT_KEYS = {
    "url": str,
    "token_path": str,
    "token_env": str,
    "insecure_http": bool,
    "fleet": str,
}


def client_file(home: str) -> Path:
    return Path(home) / CLIENT_FILE


def read_client_file(home: str) -> Endpoint | None:
    """client.json as an Endpoint, None if there is none; ApiError naming the key if bad."""
    path = client_file(home)
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ApiError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ApiError(f"{path}: must be a JSON object with url and token_path or token_env")
    for key, value in data.items():
        kind = _CLIENT_KEYS.get(key)
        if kind is None:
            raise ApiError(f"{path}: {key}: no such key (allowed: {', '.join(_CLIENT_KEYS)})")
        if value is not None and not isinstance(value, kind):
            raise ApiError(f"{path}: {key}: must be a {kind.__name__}, got {value!r}")
    if not data.get("url"):
        raise ApiError(f"{path}: url: is required (the controller's API, e.g. https://HOST:PORT)")
    if not (data.get("token_path") or data.get("token_env")):
        raise ApiError(f"{path}: token_path or token_env: one is required (the API's token)")
    token_path = data.get("token_path")
    if token_path and not os.path.isabs(os.path.expanduser(token_path)):
        token_path = str(path.parent / token_path)  # relative to the file, not the cwd
    return Endpoint(
        url=data["url"],
        token_path=token_path,
        token_env=data.get("token_env"),
        insecure_http=bool(data.get("insecure_http")),
        fleet=data.get("fleet"),
        source=str(path),
    )


def write_client_file(home: str, endpoint: Endpoint) -> bool:
    """Record the endpoint for later commands, unless a hand-written client.json is there."""
    path = client_file(home)
    try:
        existing = read_client_file(home)
    except ApiError:
        existing = None
        if path.exists():
            return False  # a broken file someone wrote: theirs to fix, not ours to replace
    if existing is not None and existing.fleet is None:
        return False
    data = {"url": endpoint.url, "fleet": endpoint.fleet, "insecure_http": endpoint.insecure_http}
    if endpoint.token_path:
        data["token_path"] = endpoint.token_path
    if endpoint.token_env:
        data["token_env"] = endpoint.token_env
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".part")
    part.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(part, path)
    return True


def from_fleet(fleet: DictConfig) -> Endpoint | None:
    """The controller a fleet file names (a remote home), if it names one."""
    c = fleet.controller
    url = c.url or (f"http://{c.host}:{c.port}" if c.port is not None else None)
    if not url:
        return None
    return Endpoint(
        url=url,
        token_path=c.token_path,
        token_env=c.token_env,
        insecure_http=bool(c.insecure_http),
        fleet=fleet.name,
        source=f"fleet.controller of fleet {fleet.name}",
    )


# ---- the local fleet's controller -------------------------------------------------------


@dataclass(frozen=True)
class LocalController:
    """What the local fleet's controller listens on, picked once and reused."""

    fleet: str
    port: int
    token_path: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def endpoint(self) -> Endpoint:
        return Endpoint(
            url=self.url,
            token_path=self.token_path,
            fleet=self.fleet,
            source=f"the local fleet {self.fleet}",
        )

    def fleet_config(self, fleet: dict) -> dict:
        """The fleet config the controller is bootstrapped with: this port and token."""
        controller = dict(fleet.get("controller") or {})
        controller.update(
            url=self.url, host="127.0.0.1", port=self.port, token_path=self.token_path
        )
        controller["token_env"] = None
        return {**fleet, "controller": controller}


def local_dir(home: str, fleet_name: str) -> Path:
    return Path(home) / "fleet" / fleet_name / "controller"


def is_local_home(fleet: DictConfig) -> bool:
    """The fleet's home (its first owned cluster) is started on this machine."""
    home = next((c for c in fleet.clusters.values() if c.kind == "owned"), None)
    return bool(home is not None and home.local)


def local_token_path(home: str, fleet_name: str) -> Path:
    return local_dir(home, fleet_name) / "token"


def is_local_fleets(endpoint: Endpoint, home: str, fleet_name: str) -> bool:
    """The endpoint is this home's local fleet controller (its token is the one made here),
    even if the record beside that token was lost."""
    return endpoint.token_path == str(local_token_path(home, fleet_name))


def local_controller(home: str, fleet_name: str, create: bool) -> LocalController | None:
    """The local fleet's controller record; made (free port, new token) when asked to."""
    cdir = local_dir(home, fleet_name)
    record = cdir / "api.json"
    try:
        data = json.loads(record.read_text())
        found = LocalController(fleet_name, int(data["port"]), str(data["token_path"]))
        if Path(found.token_path).is_file():
            return found
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if not create:
        return None
    token = new_token_file(local_token_path(home, fleet_name))
    made = LocalController(fleet_name, free_ports(1)[0], str(token))
    part = record.with_suffix(".part")
    part.write_text(json.dumps({"port": made.port, "token_path": made.token_path}) + "\n")
    os.replace(part, record)
    return made


def record_local_fleet(home: str, fleet: DictConfig) -> Endpoint | None:
    """`fleet up`: pick (once) the local fleet's controller port and token, and record them in
    client.json; None for a fleet whose controller is not local."""
    if not is_local_home(fleet) or from_fleet(fleet) is not None:
        return None
    endpoint = local_controller(home, fleet.name, create=True).endpoint()
    write_client_file(home, endpoint)
    return endpoint


def find(home: str, fleet: DictConfig | None) -> Endpoint | None:
    """The first of client.json, the fleet's controller.url, the local fleet's record (module
    docstring); None when none applies. Nothing is created here."""
    found = read_client_file(home)
    if found is not None and (fleet is None or found.fleet in (None, fleet.name)):
        return found
    if fleet is None:
        return None
    named = from_fleet(fleet)
    if named is not None:
        return named
    if is_local_home(fleet):
        local = local_controller(home, fleet.name, create=False)
        return local.endpoint() if local else None
    return None
