"""One Ray cluster of the local fleet: a real `ray start --head` on loopback.

Each cluster gets its own ports, temp dir and auth token, so two (or more) clusters live side
by side on one machine, and a client of one cannot use the other without that cluster's token.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from orchestrator.fleet.processes import session_pids, stop_session
from orchestrator.fleet.tokens import new_token_file


@dataclass
class LocalCluster:
    """What `fleet up` recorded about a cluster it started, in $SPILLWAY_HOME/fleet/NAME.json."""

    name: str
    session_id: int
    gcs_port: int
    dashboard_port: int
    agent_port: int
    client_port: int
    temp_dir: str
    token_path: str
    log_path: str
    started_at: float
    lease_start: float | None = None
    lease_end: float | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def is_running(self) -> bool:
        return bool(session_pids(self.session_id))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> LocalCluster | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback, outside Ray's default worker range 10002-19999.

    Clusters started side by side must get theirs from one call: ports picked in separate
    calls may repeat once the probing sockets are closed."""
    ports: list[int] = []
    socks = []
    while len(ports) < n:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        socks.append(s)
        if not 10002 <= port <= 19999:
            ports.append(port)
    for s in socks:
        s.close()
    return ports


def ray_env(token_path: str, temp_dir: str) -> dict[str, str]:
    """The environment of a local cluster's processes and of its in-process clients."""
    env = dict(os.environ)
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=token_path,
        # Keeps Ray on 127.0.0.1: without it Ray swaps loopback for the machine's own address.
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        TMPDIR=temp_dir,
    )
    env.pop("RAY_AUTH_TOKEN", None)  # a token in the environment would override this cluster's
    return env


# Ray puts unix sockets at TEMP/session_<date>_<time>_<us>_<pid>/sockets/dash_MetricsHead and
# the like; a socket path may hold at most 107 bytes, and the part after TEMP takes up to ~70.
MAX_TEMP_DIR_LEN = 107 - 72


def start_local_cluster(
    name: str,
    devices: int,
    device_resource: str,
    num_cpus: int,
    cluster_dir: Path,
    temp_dir: Path,
    ports: list[int] | None = None,
) -> LocalCluster:
    """Start a Ray head for cluster `name` and wait until it accepts connections.

    `ports` (GCS, dashboard, agent, client) must differ from every other cluster's; by default
    four free ones are picked here."""
    if len(str(temp_dir)) > MAX_TEMP_DIR_LEN:
        raise ValueError(
            f"Ray temp dir {temp_dir} is {len(str(temp_dir))} characters; Ray's socket paths need "
            f"it within {MAX_TEMP_DIR_LEN}: use a shorter SPILLWAY_HOME"
        )
    cluster_dir.mkdir(parents=True, exist_ok=True)
    token_path = new_token_file(cluster_dir / "token")
    temp_dir.mkdir(parents=True, exist_ok=True)
    gcs, dashboard, agent, client = ports if ports is not None else free_ports(4)
    log_path = cluster_dir / "ray-start.log"
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
        "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
        f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus}",
        f"--resources={json.dumps({device_resource: devices})}",
        "--disable-usage-stats",
    ]  # fmt: skip
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=ray_env(str(token_path), str(temp_dir)),
            start_new_session=True,
        )
        code = proc.wait(timeout=120)
    cluster = LocalCluster(
        name=name,
        session_id=proc.pid,
        gcs_port=gcs,
        dashboard_port=dashboard,
        agent_port=agent,
        client_port=client,
        temp_dir=str(temp_dir),
        token_path=str(token_path),
        log_path=str(log_path),
        started_at=time.time(),
    )
    if code != 0:
        stop_session(proc.pid)
        tail = log_path.read_text()[-2000:]
        raise RuntimeError(f"ray start for cluster {name} failed (exit {code}):\n{tail}")
    return cluster


def stop_local_cluster(cluster: LocalCluster) -> list[int]:
    return stop_session(cluster.session_id)
