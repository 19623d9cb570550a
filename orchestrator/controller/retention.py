"""The controller's retention of a job's checkpoints on one cluster's storage.

An attempt under the controller never prunes its own folder: a partitioned attempt that has not
seen its fence yet would delete the very step the next attempt is told to resume from. The
controller knows the job's current epoch for certain, so after it records a commit of the
current attempt it keeps that attempt's newest `checkpoint.keep` checkpoints there and deletes
what is older. Runs on the cluster's cleanup lane; the catalog forgets what was deleted.
"""

from __future__ import annotations

import logging

from orchestrator.checkpoint import catalog
from orchestrator.checkpoint.storage import open_root
from orchestrator.controller.paths import checkpoints_url
from orchestrator.fleet.fleet import ClusterView

log = logging.getLogger("spillway.controller")


def prune_line(cluster: ClusterView, job_id: str, epoch: int, keep: int) -> list[int]:
    """Delete the job's checkpoints on `cluster` older than epoch's newest `keep`; returns the
    deleted steps. A zombie's newer steps (another epoch) are left: they never count as kept,
    are never recorded, and the current line replaces them as it reaches their steps."""
    fs, root = open_root(checkpoints_url(cluster, job_id), cluster.storage_options)
    fs.invalidate_cache(root)
    deleted = catalog.prune(fs, root, keep, epoch=epoch)
    for step in deleted:
        log.info(
            "job %s: pruned checkpoint step %d on %s (keeping epoch %d's last %d)",
            job_id, step, cluster.name, epoch, keep,
        )  # fmt: skip
    return deleted
