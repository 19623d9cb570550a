"""What reaches a local cluster's environment, and the commands that start its nodes: pure."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from orchestrator.config import compose_run
from orchestrator.fleet.environment import cluster_env, controller_cluster, controller_env, s3_env
from orchestrator.fleet.local import WORKER_NODE, ray_start_commands

CALLER = {
    "PATH": "/venv/bin:/usr/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "PYTHONPATH": "/checkout",
    "RAY_AUTH_TOKEN": "another-clusters-token",
    "AWS_SECRET_ACCESS_KEY": "the-users-own",
    "WANDB_API_KEY": "unrelated",
    "PARTNER_RAY_TOKEN": "tok",
    "TMPDIR": "/callers/tmp",
}


def test_a_cluster_gets_what_it_needs_and_none_of_the_callers_secrets():
    env = cluster_env(CALLER, "/sw/fleet/local/home/token", "/sw/ray/home")
    assert env == {
        "PATH": "/venv/bin:/usr/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "PYTHONPATH": "/checkout",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": "/sw/fleet/local/home/token",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "TMPDIR": "/sw/ray/home",
    }


def test_an_isolated_cluster_gets_no_path_into_this_machines_checkout_and_its_own_bucket():
    bucket = s3_env("http://127.0.0.1:9000", {"key": "K", "secret": "S"})
    env = cluster_env(CALLER, "/t", "/r", isolated=True, extra=bucket)
    assert "PYTHONPATH" not in env
    assert {k: env[k] for k in bucket} == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_ACCESS_KEY_ID": "K",
        "AWS_SECRET_ACCESS_KEY": "S",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def test_the_controllers_cluster_gets_the_state_dir_and_the_named_token_sources(tmp_path):
    cfg = compose_run(
        [f"state_dir={tmp_path}", "fleet.clusters.partner.token_env=PARTNER_RAY_TOKEN"]
    )
    assert controller_cluster(cfg.fleet) == "home"
    env = controller_env(cfg.fleet, str(tmp_path), CALLER)
    assert env == {"SPILLWAY_HOME": str(tmp_path), "PARTNER_RAY_TOKEN": "tok"}


def test_a_two_node_cluster_is_a_head_and_one_worker_with_devices_and_cpus_split():
    head, worker = ray_start_commands(
        4, "spillway_device", 8, Path("/sw/ray/partner"), [101, 102, 103, 104, 105], nodes=2
    )
    assert head[:5] == [sys.executable, "-m", "ray.scripts.scripts", "start", "--head"]
    assert "--port=101" in head and "--dashboard-port=102" in head
    assert "--dashboard-agent-listen-port=103" in head and "--ray-client-server-port=104" in head
    assert "--num-cpus=4" in head and '--resources={"spillway_device": 2}' in head
    assert "--node-ip-address=127.0.0.1" in head
    assert worker[:3] == [sys.executable, "-c", WORKER_NODE]
    params = json.loads(worker[3])
    assert params["gcs_address"] == "127.0.0.1:101"
    assert params["node_ip_address"] == "127.0.0.1"
    assert params["dashboard_agent_listen_port"] == 105  # Ray's default would repeat the head's
    assert params["num_cpus"] == 4 and params["resources"] == {"spillway_device": 2}
    assert params["temp_dir"] == "/sw/ray/partner"


def test_a_one_node_cluster_is_one_head():
    (head,) = ray_start_commands(2, "spillway_device", 4, Path("/r"), [1, 2, 3, 4])
    assert "--num-cpus=4" in head and '--resources={"spillway_device": 2}' in head
