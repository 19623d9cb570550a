"""A planned lease end: the job on the lease drains in time and continues at home on another
world size, with its checkpoint copied and verified, and no step redone."""

from __future__ import annotations

import pytest

from tests.e2e.faults import Uninterrupted, assert_losses_match, metrics
from tests.e2e.test_jobs import TINY, job, launch

pytestmark = pytest.mark.slow

CROSS_WORLD = 1e-5  # measured: 2.4e-7 over 400 steps, 4 ranks then 2


def test_job_leaves_the_lease_before_it_ends_and_continues_at_home(spillway, fleet_home):
    reference = Uninterrupted(fleet_home, 2, [*TINY, "trainer.max_steps=400"])
    up = spillway("fleet", "up", "fleet.clusters.partner.lease_end=+100s")
    assert up.returncode == 0, up.stderr
    # Placed on partner only with >= 60 s of lease left; drained at <= 50 s left, when it can
    # no longer go back there, so it moves home (2 devices instead of 4).
    h = launch(
        spillway,
        "trainer.max_steps=400",
        "run_name=H",
        "placement.clusters=[partner,home]",
        "resources.devices=4",
        "resources.min_devices=2",
        "placement.min_lease_left_s=60",
        "placement.lease_drain_margin_s=50",
    )
    waited = spillway("wait", h, "--timeout", "400", timeout=460)
    info = job(spillway, h)
    assert waited.returncode == 0, info
    first, second = info["attempts"]
    assert (first["cluster"], first["world_size"], first["state"]) == ("partner", 4, "DRAINED")
    assert (second["cluster"], second["world_size"], second["state"]) == ("home", 2, "SUCCEEDED")
    assert second["first_step"] == first["last_step"] + 1, "a planned lease end loses no step"
    assert second["last_step"] == 400
    causes = [e["cause"] for e in info["events"]]
    assert any(c.startswith("lease on partner ends in") for c in causes), causes
    assert any(
        c.startswith(f"copied checkpoint step {first['last_step']} from partner to home")
        for c in causes
    )
    assert second["steps_redone"] == 0 and second["copy_step"] == first["last_step"]
    # Steps on 4 ranks sum their gradients in another order than the 2-rank run compared with.
    assert_losses_match(metrics(spillway, h), reference.losses(), CROSS_WORLD)
    assert spillway("fleet", "down").returncode == 0
