"""From a composed run config to what the controller stores and the policy reads."""

from __future__ import annotations

import json

from omegaconf import DictConfig, OmegaConf

from orchestrator.controller.state import JobRecord
from orchestrator.scheduling import JobRequest
from orchestrator.scheduling.admission import allowed_world_sizes

__all__ = ["allowed_world_sizes", "job_record", "job_request"]


def job_record(job_id: str, cfg: DictConfig, overrides: list[str]) -> JobRecord:
    return JobRecord(
        job_id=job_id,
        name=cfg.run_name,
        run_config=json.dumps(OmegaConf.to_container(cfg)),
        world_sizes=allowed_world_sizes(cfg),
        overrides=list(overrides),
        device_types=list(cfg.placement.device_types),
        clusters=list(cfg.placement.clusters),
        priority=cfg.placement.priority,
        budget=cfg.placement.budget,
    )


def job_request(job: JobRecord) -> JobRequest:
    placement = json.loads(job.run_config)["placement"]
    return JobRequest(
        job_id=job.job_id,
        world_sizes=tuple(job.world_sizes),
        device_types=tuple(job.device_types),
        # A migration or a recovery pins where the next attempt goes.
        clusters=tuple(job.next_clusters if job.next_clusters is not None else job.clusters),
        priority=job.priority,
        submitted_at=job.submitted_at,
        waiting_since=job.waiting_since,
        budget=job.budget,
        cost_so_far=job.cost_so_far,
        spill_after_s=placement["spill_after_s"],
        min_lease_left_s=placement["min_lease_left_s"],
        not_before=job.not_before,
        failures=job.failures,
    )
