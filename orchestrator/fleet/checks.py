"""What a fleet description must satisfy before anything is started or submitted."""

from __future__ import annotations

from omegaconf import DictConfig

from orchestrator.config import ConfigError
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
