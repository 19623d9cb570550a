"""`spillway fleet up | status | down` with two real Ray clusters on loopback."""

from __future__ import annotations

import json

import pytest
from ray.job_submission import JobSubmissionClient

from orchestrator.fleet.local import LocalCluster
from orchestrator.fleet.processes import session_pids

pytestmark = pytest.mark.slow


def records(home) -> dict[str, LocalCluster]:
    fdir = home / "fleet" / "local"
    return {p.stem: LocalCluster.load(p) for p in sorted(fdir.glob("*.json"))}


def test_fleet_up_status_tokens_and_down(spillway, fleet_home):
    up = spillway("fleet", "up", "fleet.clusters.partner.lease_end=+10m")
    assert up.returncode == 0, up.stderr[-3000:]
    *table_rows, s3_line = up.stdout.splitlines()[1:]
    assert [line.split()[:3] for line in table_rows] == [
        ["home", "owned", "started"],
        ["partner", "leased", "started"],
    ]
    assert s3_line.startswith("s3 server: started at http://127.0.0.1:"), s3_line
    started = records(fleet_home)
    assert set(started) == {"home", "partner"}
    home, partner = started["home"], started["partner"]
    assert home.address.startswith("127.0.0.1:") and partner.address.startswith("127.0.0.1:")
    assert len({home.gcs_port, home.dashboard_port, partner.gcs_port, partner.dashboard_port}) == 4
    assert (fleet_home / "fleet/local/home/token").read_text() != (
        fleet_home / "fleet/local/partner/token"
    ).read_text()

    again = spillway("fleet", "up")
    *table_rows, s3_line = again.stdout.splitlines()[1:]
    assert [line.split()[2] for line in table_rows] == ["running", "running"]
    assert records(fleet_home)["partner"].gcs_port == partner.gcs_port

    status = spillway.json("fleet", "status")
    by_name = {c["name"]: c for c in status["clusters"]}
    assert by_name["home"]["reachable"] and by_name["partner"]["reachable"]
    assert by_name["home"]["devices_total"] == 2 and by_name["partner"]["devices_total"] == 4
    assert by_name["home"]["lease_left_s"] is None
    assert 500 < by_name["partner"]["lease_left_s"] <= 600
    assert by_name["partner"]["cost_per_device_hour"] == 2.5
    assert by_name["partner"]["dashboard_url"] == partner.dashboard_url
    assert by_name["home"]["running_jobs"] == 0

    human = spillway("fleet", "status")
    assert human.returncode == 0 and "partner  leased  cpu     yes" in human.stdout

    # Each cluster accepts only its own token.
    home_token = (fleet_home / "fleet/local/home/token").read_text()
    partner_token = (fleet_home / "fleet/local/partner/token").read_text()
    for headers in ({}, {"Authorization": f"Bearer {home_token}"}):
        with pytest.raises(Exception, match="(?i)unauthorized|authentication|401|403"):
            JobSubmissionClient(partner.dashboard_url, headers=headers).list_jobs()
    authorized = {"Authorization": f"Bearer {partner_token}"}
    assert JobSubmissionClient(partner.dashboard_url, headers=authorized).list_jobs() == []

    down = spillway("fleet", "down")
    assert down.returncode == 0
    for cluster in (home, partner):
        assert session_pids(cluster.session_id) == [], f"{cluster.name} left processes behind"
    assert records(fleet_home) == {}
    after = spillway.json("fleet", "status")
    assert [c["reachable"] for c in after["clusters"]] == [False, False]


def test_bad_fleet_overrides_start_nothing(spillway, fleet_home):
    done = spillway("fleet", "up", "fleet.clusters.partner.lease_end=tomorrow")
    assert done.returncode == 2
    assert done.stderr.strip().startswith("spillway: bad config: fleet.clusters.partner.lease_end:")
    assert "Traceback" not in done.stderr
    assert records(fleet_home) == {}
    json.loads(spillway("fleet", "status", "--json").stdout)
