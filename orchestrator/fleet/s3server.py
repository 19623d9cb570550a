"""The local fleet's own S3 server: moto's server mode on 127.0.0.1, started by `fleet up`.

It runs in a session of its own, like a cluster, and is stopped by its own PIDs. Its keys are
made fresh when it first starts and written, readable only by their owner, to a JSON file of
fsspec options ({"key": ..., "secret": ...}) beside its record in $SPILLWAY_HOME/fleet/FLEET/s3/.
Objects live in the server's memory: `fleet down` drops every bucket, as a lease's end would.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.fleet.processes import session_pids, stop_session
from orchestrator.fleet.records import JsonRecord
from orchestrator.fleet.storage_options import merge_storage_options


@dataclass
class S3Server(JsonRecord):
    """What `fleet up` recorded about the S3 server it started, in s3/server.json."""

    session_id: int
    port: int
    credentials_path: str
    log_path: str
    started_at: float

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def is_running(self) -> bool:
        return bool(session_pids(self.session_id))

    def credentials(self) -> dict[str, str]:
        return json.loads(Path(self.credentials_path).read_text())

    def storage_options(self) -> dict[str, Any]:
        return merge_storage_options({}, self.credentials(), self.endpoint)


def server_dir(fleet_dir: Path) -> Path:
    return fleet_dir / "s3"


def record_path(fleet_dir: Path) -> Path:
    return server_dir(fleet_dir) / "server.json"


def credentials_path(fleet_dir: Path) -> Path:
    return server_dir(fleet_dir) / "credentials.json"


def new_credentials_file(path: Path) -> Path:
    """Fresh random keys, as a JSON object of fsspec options readable only by its owner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = {"key": "SW" + secrets.token_hex(9).upper(), "secret": secrets.token_urlsafe(30)}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_TRUNC
    with os.fdopen(fd, "w") as f:
        json.dump(keys, f)
    return path


def start_s3_server(
    fleet_dir: Path, port: int, env: dict[str, str], timeout_s: float = 30.0
) -> S3Server:
    """Start the server on 127.0.0.1:port and wait until it accepts connections."""
    missing = [pkg for pkg in ("moto", "flask", "s3fs") if importlib.util.find_spec(pkg) is None]
    if missing:
        raise RuntimeError(
            f"the local fleet's S3 server needs {', '.join(missing)}: "
            "pip install 'moto[server]' s3fs"
        )
    sdir = server_dir(fleet_dir)
    sdir.mkdir(parents=True, exist_ok=True)
    creds = credentials_path(fleet_dir)
    if not creds.is_file():
        new_credentials_file(creds)
    log_path = sdir / "server.log"
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=sdir, start_new_session=True
        )
    server = S3Server(proc.pid, port, str(creds), str(log_path), time.time())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return server
        except OSError:
            time.sleep(0.1)
    stop_session(proc.pid)
    tail = log_path.read_text()[-2000:]
    raise RuntimeError(
        f"the local S3 server on 127.0.0.1:{port} did not start within {timeout_s:.0f}s:\n{tail}"
    )


def ensure_buckets(server: S3Server, buckets: list[str]) -> None:
    """Create each bucket that does not exist yet (each call bounded by the options' timeouts)."""
    import s3fs

    fs = s3fs.S3FileSystem(**server.storage_options(), skip_instance_cache=True)
    for bucket in buckets:
        try:
            if not fs.exists(bucket):
                fs.mkdir(bucket)
        except OSError as exc:
            raise RuntimeError(
                f"cannot create bucket {bucket} on {server.endpoint}: {exc}"
            ) from None


def stop_s3_server(server: S3Server) -> list[int]:
    return stop_session(server.session_id)
