"""The environment a local cluster's processes start with: what the cluster needs, no more.

Not the caller's shell: a cluster never gets another cluster's token or credentials it has no
use for. Every rank, driver and job on the cluster inherits this environment from its raylet.
"""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig

# What a Python process needs to run at all here, and what a GPU machine adds. Nothing secret.
PASSTHROUGH = (
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ",
    "LD_LIBRARY_PATH", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "CUDA_HOME",
)  # fmt: skip

# The local S3 server's region: moto serves every region, s3fs needs one to sign requests.
S3_REGION = "us-east-1"


def base_env(caller: Mapping[str, str], isolated: bool = False) -> dict[str, str]:
    """What any process Spillway starts on this machine keeps of the caller's environment."""
    env = {k: caller[k] for k in PASSTHROUGH if k in caller}
    # A caller's PYTHONPATH names this machine's directories; an isolated cluster stands for
    # another machine, where they mean nothing (and might reach Spillway's hidden sources).
    if not isolated and "PYTHONPATH" in caller:
        env["PYTHONPATH"] = caller["PYTHONPATH"]
    return env


def cluster_env(
    caller: Mapping[str, str],
    token_path: str,
    temp_dir: str,
    isolated: bool = False,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of one local cluster's `ray start`, made from the caller's."""
    env = base_env(caller, isolated)
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=token_path,
        # Keeps Ray on 127.0.0.1: without it Ray swaps loopback for the machine's own address
        # (even where --node-ip-address=127.0.0.1 says otherwise) and listens on every interface.
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        # The device counts the probe reads come from the autoscaler's summary, refreshed every
        # 5 s by default: a node that just joined (the partner's second) was missed for 14 s
        # after `fleet up`. Ray's own test clusters refresh it every second too.
        AUTOSCALER_UPDATE_INTERVAL_S="1",
        TMPDIR=temp_dir,
    )
    env.update(extra or {})
    return env


def s3_env(endpoint: str, credentials: Mapping[str, str]) -> dict[str, str]:
    """The standard AWS variables for a bucket on `endpoint`: plain s3:// URLs then reach it."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": credentials["key"],
        "AWS_SECRET_ACCESS_KEY": credentials["secret"],
        "AWS_DEFAULT_REGION": S3_REGION,
    }


def controller_cluster(fleet: DictConfig) -> str | None:
    """The cluster the controller runs on: the first owned one in fleet order."""
    return next((name for name, c in fleet.clusters.items() if c.kind == "owned"), None)


def controller_env(fleet: DictConfig, state_dir: str, caller: Mapping[str, str]) -> dict[str, str]:
    """What the controller's cluster adds: the state dir, and the variables the fleet config
    names as token or credential sources (the controller reaches every cluster with them)."""
    names = [fleet.controller.token_env] if fleet.get("controller") else []
    for c in fleet.clusters.values():
        names += [c.token_env, c.storage_credentials_env]
    env = {name: caller[name] for name in names if name and name in caller}
    env["SPILLWAY_HOME"] = state_dir
    return env
