"""What a fleet description must satisfy before anything is started or submitted."""

from __future__ import annotations

from omegaconf import DictConfig

from orchestrator.config import ConfigError
from orchestrator.fleet.environment import controller_cluster
from orchestrator.fleet.leases import resolve_time


def validate_fleet(fleet: DictConfig) -> None:
    if not fleet.clusters:
        raise ConfigError("fleet.clusters", "names no cluster (allowed: one or more clusters)")
    for name, c in fleet.clusters.items():
        key = f"fleet.clusters.{name}"
        if c.kind not in ("owned", "leased"):
            raise ConfigError(f"{key}.kind", f"'{c.kind}' is not allowed (allowed: owned, leased)")
        if c.devices < 1:
            raise ConfigError(f"{key}.devices", f"must be >= 1, got {c.devices}")
        if c.cost_per_device_hour < 0:
            raise ConfigError(
                f"{key}.cost_per_device_hour", f"must be >= 0, got {c.cost_per_device_hour}"
            )
        if not c.device_resource:
            raise ConfigError(
                f"{key}.device_resource", "is empty (allowed: GPU or a custom resource name)"
            )
        if not c.local and not (c.address and c.dashboard_url):
            raise ConfigError(
                f"{key}.address", "a cluster not started locally needs address and dashboard_url"
            )
        if c.kind == "leased" and c.lease_end is None:
            raise ConfigError(
                f"{key}.lease_end", "a leased cluster needs a lease end (e.g. +30m or an ISO time)"
            )
        for field in ("lease_start", "lease_end"):
            try:
                resolve_time(c[field], 0.0)
            except ValueError as exc:
                raise ConfigError(f"{key}.{field}", str(exc)) from None
        _check_storage(key, c)
        _check_local_shape(key, c, is_controller_host=name == controller_cluster(fleet))


def _check_storage(key: str, c: DictConfig) -> None:
    if c.storage_credentials_file and c.storage_credentials_env:
        raise ConfigError(
            f"{key}.storage_credentials_env",
            "is set beside storage_credentials_file (allowed: one of them)",
        )
    if not c.local_s3:
        return
    if not c.local:
        raise ConfigError(
            f"{key}.local_s3", "only a local cluster uses the fleet's S3 server (set local: true)"
        )
    if not str(c.storage_root).startswith("s3://") or not str(c.storage_root)[5:].split("/")[0]:
        raise ConfigError(
            f"{key}.storage_root",
            f"'{c.storage_root}' is not on the fleet's S3 server (allowed: s3://BUCKET/...)",
        )
    if "endpoint_url" in (c.storage_options or {}):
        raise ConfigError(
            f"{key}.storage_options.endpoint_url",
            "is set on a local_s3 cluster, whose endpoint is the fleet's own S3 server",
        )


def _check_local_shape(key: str, c: DictConfig, is_controller_host: bool) -> None:
    if c.nodes < 1:
        raise ConfigError(f"{key}.nodes", f"must be >= 1, got {c.nodes}")
    if c.nodes > 1 and not c.local:
        raise ConfigError(
            f"{key}.nodes", "only a local cluster is started with nodes (set local: true)"
        )
    if c.devices % c.nodes:
        raise ConfigError(
            f"{key}.nodes", f"{c.nodes} nodes cannot split {c.devices} devices evenly"
        )
    if c.num_cpus is not None and (c.num_cpus < c.nodes or c.num_cpus % c.nodes):
        raise ConfigError(
            f"{key}.num_cpus", f"{c.num_cpus} CPUs cannot be split evenly over {c.nodes} nodes"
        )
    if c.isolated and not c.local:
        raise ConfigError(
            f"{key}.isolated", "only a local cluster is started isolated (set local: true)"
        )
    if c.isolated and is_controller_host:
        raise ConfigError(
            f"{key}.isolated",
            "the controller's cluster (the first owned one) needs its state dir: not isolated",
        )
