"""The controller's retention of a job's checkpoints on one cluster's storage.

An attempt under the controller never prunes its own folder: a partitioned attempt that has not
seen its fence yet would delete the very step the next attempt is told to resume from. The
controller knows the job's current epoch for certain, so after it records a commit of the
current attempt it keeps that attempt's newest `checkpoint.keep` checkpoints there and deletes
what is older. Runs on the cluster's cleanup lane, in two calls with the catalog in between:
the catalog forgets the doomed steps before they are deleted, so a controller killed (or a
delete failing) half way leaves old dirs nothing names, which the next prune there takes,
and never a catalog row naming a checkpoint that is gone.
"""

from __future__ import annotations

import logging

from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.storage import open_root
from orchestrator.controller.paths import checkpoints_url
from orchestrator.fleet.fleet import ClusterView

log = logging.getLogger("spillway.controller")


def doomed_steps(cluster: ClusterView, job_id: str, epoch: int, keep: int) -> list[int]:
    """The job's checkpoints on `cluster` older than epoch's newest `keep`, newest first;
    deletes nothing. A zombie's newer steps (another epoch) are not among them: they never
    count as kept, are never recorded, and the current line replaces them as it reaches
    their steps."""
    fs, root = open_root(checkpoints_url(cluster, job_id), cluster.storage_options)
    fs.invalidate_cache(root)
    return catalog.prune_plan(fs, root, keep, epoch=epoch)


def delete_steps(cluster: ClusterView, job_id: str, steps: list[int]) -> None:
    """Delete the job's checkpoints at `steps` on `cluster`; the catalog forgot them first."""
    fs, root = open_root(checkpoints_url(cluster, job_id), cluster.storage_options)
    catalog.remove_steps(fs, root, steps)
    for step in steps:
        log.info("job %s: pruned checkpoint step %d on %s", job_id, step, cluster.name)
