"""Whether a run config could ever run on its fleet: checked by the CLI at launch and again by
the controller's API before it records anything. Pure: no clock, no file, no network.

Lease timing, free devices and reachability change, so they are left out: only a job that no
accepted cluster could ever take is refused here.
"""

from __future__ import annotations

from omegaconf import DictConfig

from orchestrator.config.errors import ConfigError
from orchestrator.config.validate import validate, validate_sizes
from orchestrator.fleet.checks import validate_fleet
from orchestrator.scheduling.policy import infeasible
from orchestrator.scheduling.types import ClusterSnapshot, JobRequest, cluster_snapshot


def allowed_world_sizes(cfg: DictConfig) -> list[int]:
    """World sizes from resources.min_devices to resources.devices that divide the global batch."""
    high = cfg.resources.devices
    low = cfg.resources.min_devices if cfg.resources.min_devices is not None else high
    return [w for w in range(max(1, low), high + 1) if cfg.trainer.global_batch_size % w == 0]


def static_snapshots(fleet: DictConfig) -> list[ClusterSnapshot]:
    """Every cluster of the fleet whole, free and inside an endless lease."""
    return [cluster_snapshot(name, c) for name, c in fleet.clusters.items()]


def static_request(cfg: DictConfig, sizes: list[int]) -> JobRequest:
    p = cfg.placement
    return JobRequest(
        job_id="preview",
        world_sizes=tuple(sizes),
        device_types=tuple(p.device_types),
        clusters=tuple(p.clusters),
        priority=p.priority,
        budget=p.budget,
        spill_after_s=p.spill_after_s,
        min_lease_left_s=p.min_lease_left_s,
    )


def admit(cfg: DictConfig) -> list[int]:
    """The run config's allowed world sizes; ConfigError naming the key unless some cluster of
    its fleet could run it."""
    validate_fleet(cfg.fleet)
    validate_sizes(cfg)  # a negative batch is named, not reported as "no world size"
    sizes = allowed_world_sizes(cfg)
    if not sizes:
        low = cfg.resources.min_devices or cfg.resources.devices
        raise ConfigError(
            "resources.devices",
            f"no world size from {low} to {cfg.resources.devices} divides "
            f"trainer.global_batch_size={cfg.trainer.global_batch_size}",
        )
    device_types = {c.device_type for c in cfg.fleet.clusters.values()}
    validate(cfg, sizes[0], device_type="cpu" if device_types == {"cpu"} else None)
    reason = infeasible(static_request(cfg, sizes), static_snapshots(cfg.fleet))
    if reason:
        named = cfg.placement.clusters and "placement.clusters" in reason
        raise ConfigError("placement.clusters" if named else "resources.devices", reason)
    return sizes
