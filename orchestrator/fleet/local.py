"""One Ray cluster of the local fleet: a real `ray start --head` on loopback, and its workers.

Each cluster gets its own ports, temp dir and auth token, so two (or more) clusters live side
by side on one machine, and a client of one cannot use the other without that cluster's token.
Its raylets start from orchestrator.fleet.namespace, inside a private mount namespace when the
cluster is isolated, all in one session, so that stopping the session stops every node.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.fleet.environment import cluster_env
from orchestrator.fleet.processes import session_pids, stop_session
from orchestrator.fleet.records import JsonRecord
from orchestrator.fleet.tokens import new_token_file

# A private mount namespace whose mounts reach neither this machine's nor any other namespace.
UNSHARE = ["unshare", "--mount", "--propagation", "private"]


@dataclass
class LocalCluster(JsonRecord):
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
    nodes: int = 1
    # Each worker raylet's dashboard agent port (the one port Ray would give every node alike).
    worker_agent_ports: list[int] = field(default_factory=list)
    isolated: bool = False  # its processes run in their own mount namespace

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def is_running(self) -> bool:
        return bool(session_pids(self.session_id))


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


# Ray puts unix sockets at TEMP/session_<date>_<time>_<us>_<pid>/sockets/dash_MetricsHead and
# the like; a socket path may hold at most 107 bytes, and the part after TEMP takes up to ~70.
MAX_TEMP_DIR_LEN = 107 - 72


def namespace_refusal(timeout_s: float = 10.0) -> str | None:
    """Why this machine will not give a process a private mount namespace (None: it will)."""
    try:
        done = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        return "unshare is not installed"
    except subprocess.TimeoutExpired:
        return f"unshare did not answer within {timeout_s:.0f}s"
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return lines[-1] if lines else f"unshare exited {done.returncode}"
    return None


# A worker raylet joins the head the way `ray start --address` does, through Ray's Node (as
# ray.cluster_utils does for several nodes on one machine): the CLI refuses a second node while
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the one setting that keeps Ray on loopback. Inline code,
# since Spillway's own sources may be hidden from it by then.
WORKER_NODE = (
    "import json, sys\n"
    "from ray._private.node import Node\n"
    "from ray._private.parameter import RayParams\n"
    "Node(RayParams(**json.loads(sys.argv[1])), head=False, shutdown_at_exit=False,"
    " spawn_reaper=False)\n"
)


def ray_start_commands(
    devices: int,
    device_resource: str,
    num_cpus: int,
    temp_dir: Path,
    ports: list[int],
    nodes: int = 1,
) -> list[list[str]]:
    """The head's `ray start`, then one worker raylet each, devices and CPUs split evenly.

    `ports` are the head's GCS, dashboard, agent and client ports, then each worker's agent
    port (Ray would give every node the same default one); a node picks its other ports free."""
    gcs, dashboard, agent, client, *worker_agents = ports
    if len(worker_agents) != nodes - 1:
        raise ValueError(f"{nodes} nodes need {3 + nodes} ports, got {len(ports)}")
    per_node = {"num_cpus": num_cpus // nodes, "resources": {device_resource: devices // nodes}}
    head = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
        "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
        f"--temp-dir={temp_dir}", f"--num-cpus={per_node['num_cpus']}",
        f"--resources={json.dumps(per_node['resources'])}",
        "--disable-usage-stats",
    ]  # fmt: skip
    workers = [
        [
            sys.executable,
            "-c",
            WORKER_NODE,
            json.dumps(
                {
                    "node_ip_address": "127.0.0.1",
                    "gcs_address": f"127.0.0.1:{gcs}",
                    "temp_dir": str(temp_dir),
                    **per_node,
                    "dashboard_agent_listen_port": port,
                    "node_manager_port": 0,
                    # The head's log monitor already serves this machine's logs.
                    "include_log_monitor": False,
                }
            ),
        ]
        for port in worker_agents
    ]
    return [head, *workers]


def start_local_cluster(
    name: str,
    devices: int,
    device_resource: str,
    num_cpus: int,
    cluster_dir: Path,
    temp_dir: Path,
    ports: list[int] | None = None,
    nodes: int = 1,
    mounts: list[dict[str, str]] | None = None,
    extra_env: Mapping[str, str] | None = None,
    timeout_s: float = 120.0,
) -> LocalCluster:
    """Start cluster `name` (a head, and nodes - 1 workers) and wait until its raylets are up.

    `ports` (see ray_start_commands) must differ from every other cluster's; by default free
    ones are picked here. With `mounts` (steps of isolation.mount_plan) the cluster starts in a
    private mount namespace that carries them out; `extra_env` adds to its minimal environment."""
    if len(str(temp_dir)) > MAX_TEMP_DIR_LEN:
        raise ValueError(
            f"Ray temp dir {temp_dir} is {len(str(temp_dir))} characters; Ray's socket paths need "
            f"it within {MAX_TEMP_DIR_LEN}: use a shorter SPILLWAY_HOME"
        )
    cluster_dir.mkdir(parents=True, exist_ok=True)
    token_path = new_token_file(cluster_dir / "token")
    temp_dir.mkdir(parents=True, exist_ok=True)
    ports = ports if ports is not None else free_ports(3 + nodes)
    commands = ray_start_commands(devices, device_resource, num_cpus, temp_dir, ports, nodes)
    isolated = mounts is not None
    plan = {"mounts": mounts or [], "commands": commands, "timeout_s": timeout_s}
    runner = [sys.executable, "-m", "orchestrator.fleet.namespace", json.dumps(plan)]
    log_path = cluster_dir / "ray-start.log"
    env = cluster_env(os.environ, str(token_path), str(temp_dir), isolated, extra_env)
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [*UNSHARE, *runner] if isolated else runner,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            # Its own dir: a cluster's processes never depend on where the caller stands.
            cwd=temp_dir,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=timeout_s * len(commands) + 10)
        except subprocess.TimeoutExpired:
            code = None
    gcs, dashboard, agent, client, *worker_agents = ports
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
        nodes=nodes,
        worker_agent_ports=worker_agents,
        isolated=isolated,
    )
    if code != 0:
        stop_session(proc.pid)
        tail = log_path.read_text()[-2000:]
        what = "timed out" if code is None else f"exit {code}"
        raise RuntimeError(f"ray start for cluster {name} failed ({what}):\n{tail}")
    return cluster


def stop_local_cluster(cluster: LocalCluster) -> list[int]:
    return stop_session(cluster.session_id)
