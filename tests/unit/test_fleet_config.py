"""Lease times, fleet checks and the table helpers: no cluster is started here."""

from __future__ import annotations

import subprocess
import time

import pytest

from orchestrator.config import ConfigError, compose_run
from orchestrator.console import duration, table
from orchestrator.fleet.checks import validate_fleet
from orchestrator.fleet.leases import resolve_time
from orchestrator.fleet.processes import session_pids, stop_session


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("+0s", 1000.0),
        ("+90s", 1090.0),
        ("+30m", 2800.0),
        ("+2h", 8200.0),
        ("+1.5d", 130600.0),
        (None, None),
    ],
)
def test_offsets_count_from_the_anchor(spec, expected):
    assert resolve_time(spec, anchor=1000.0) == expected


def test_iso_times_are_absolute_and_utc_by_default():
    assert resolve_time("2026-12-01T00:00:00Z", anchor=0) == 1796083200.0
    assert resolve_time("2026-12-01T00:00:00", anchor=0) == 1796083200.0
    assert resolve_time("2026-12-01T01:00:00+01:00", anchor=0) == 1796083200.0


@pytest.mark.parametrize("spec", ["30m", "+30x", "tomorrow", "+-5m"])
def test_bad_lease_times_are_refused(spec):
    with pytest.raises(ValueError, match="neither an offset"):
        resolve_time(spec, anchor=0)


def test_shipped_fleets_validate():
    for name in ("local", "example_partner"):
        validate_fleet(compose_run([f"fleet={name}"]).fleet)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["fleet.clusters.partner.kind=rented"], "fleet.clusters.partner.kind"),
        (["fleet.clusters.home.devices=0"], "fleet.clusters.home.devices"),
        (
            ["fleet.clusters.partner.cost_per_device_hour=-1"],
            "fleet.clusters.partner.cost_per_device_hour",
        ),
        (["fleet.clusters.partner.lease_end=null"], "fleet.clusters.partner.lease_end"),
        (["fleet.clusters.partner.lease_end=soon"], "fleet.clusters.partner.lease_end"),
        (["fleet.clusters.home.local=false"], "fleet.clusters.home.address"),
        (["fleet.clusters.partner.nodes=0"], "fleet.clusters.partner.nodes"),
        (["fleet.clusters.partner.nodes=3"], "fleet.clusters.partner.nodes"),
        (["fleet.clusters.partner.num_cpus=7"], "fleet.clusters.partner.num_cpus"),
        (["fleet.clusters.home.isolated=true"], "fleet.clusters.home.isolated"),
        (
            ["fleet.clusters.partner.storage_root=/data/partner"],
            "fleet.clusters.partner.storage_root",
        ),
        (["fleet.clusters.partner.storage_root=s3://"], "fleet.clusters.partner.storage_root"),
        (
            ["+fleet.clusters.partner.storage_options.endpoint_url=http://127.0.0.1:1"],
            "fleet.clusters.partner.storage_options.endpoint_url",
        ),
        (
            ["fleet.clusters.partner.storage_credentials_env=PARTNER_S3"],
            "fleet.clusters.partner.storage_credentials_env",
        ),
    ],
)
def test_bad_fleets_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        validate_fleet(compose_run(overrides).fleet)
    assert err.value.key == key


@pytest.mark.parametrize("field", ["nodes=2", "isolated=true", "local_s3=true"])
def test_only_a_local_cluster_takes_local_only_settings(field):
    name = field.split("=")[0]
    cfg = compose_run(["fleet=example_partner", f"fleet.clusters.partner.{field}"])
    with pytest.raises(ConfigError) as err:
        validate_fleet(cfg.fleet)
    assert err.value.key == f"fleet.clusters.partner.{name}"


def test_the_local_partner_is_isolated_on_two_nodes_with_its_bucket_and_home_is_not():
    clusters = compose_run([]).fleet.clusters
    assert (clusters.partner.isolated, clusters.partner.nodes, clusters.partner.local_s3) == (
        True,
        2,
        True,
    )
    assert clusters.partner.storage_root.startswith("s3://")
    assert (clusters.home.isolated, clusters.home.nodes, clusters.home.local_s3) == (
        False,
        1,
        False,
    )


def test_durations_and_tables_read_well():
    assert [duration(s) for s in (5, 65, 3700, 90000, -30, None)] == [
        "5s",
        "1m05s",
        "1h01m",
        "1d01h",
        "-30s",
        None,
    ]
    assert table(("a", "bb"), [(1, None), ("xyz", 2)]).splitlines() == [
        "a    bb",
        "1    -",
        "xyz  2",
    ]


def test_stop_session_stops_exactly_the_sessions_processes():
    leader = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"], start_new_session=True)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while len(session_pids(leader.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        members = session_pids(leader.pid)
        assert leader.pid in members and len(members) == 3
        assert bystander.pid not in members
        assert sorted(stop_session(leader.pid, grace_s=5)) == members
        leader.wait(timeout=5)
        assert session_pids(leader.pid) == []
        assert bystander.poll() is None, "a process outside the session was touched"
    finally:
        bystander.kill()
        bystander.wait()
        leader.kill()
