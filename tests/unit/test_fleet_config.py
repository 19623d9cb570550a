"""Lease times, fleet checks and the table helpers: no cluster is started here."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from orchestrator.config import ConfigError, compose_run
from orchestrator.console import duration, table
from orchestrator.fleet.checks import (
    controller_fleet,
    typed_fleet,
    validate_fleet,
    validate_fleet_sources,
)
from orchestrator.fleet.leases import is_offset, lease_window, resolve_time
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


PARTNER = "fleet.clusters.partner"
HOME = "fleet.clusters.home"


# What validate_fleet accepted before and the controller's loop then tripped over, each now
# one line naming the key.
@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        # A remote lease with an end but no start: every tick raised, no placement anywhere.
        ([f"{PARTNER}.lease_start=null"], f"{PARTNER}.lease_start"),
        # Offsets count from `fleet up`, which never starts a remote cluster: a lease that
        # would slide with the clock.
        ([f"{PARTNER}.lease_end=+30m"], f"{PARTNER}.lease_end"),
        ([f"{PARTNER}.lease_end=2026-11-30T00:00:00Z"], f"{PARTNER}.lease_end"),
        ([f"{HOME}.lease_end=2026-12-15T00:00:00Z"], f"{HOME}.lease_end"),
        ([f"{PARTNER}.dashboard_url=http://127.0.0.1:8265"], f"{PARTNER}.dashboard_url"),
        ([f"{PARTNER}.address=127.0.0.1:6379"], f"{PARTNER}.address"),
        ([f"{PARTNER}.storage_root=s3://acme-training/checkpoints"], f"{PARTNER}.storage_root"),
        ([f"{PARTNER}.dashboard_url=ray.partner.example:8265"], f"{PARTNER}.dashboard_url"),
        ([f"{PARTNER}.address=203.0.113.10"], f"{PARTNER}.address"),
        ([f"{HOME}.kind=leased", f"{HOME}.lease_start=2026-12-01T00:00:00Z",
          f"{HOME}.lease_end=2026-12-02T00:00:00Z"], "fleet.clusters"),  # no owned: no home
        ([f"{PARTNER}.device_type=''"], f"{PARTNER}.device_type"),
        ([f"{PARTNER}.cost_per_device_hour=nan"], f"{PARTNER}.cost_per_device_hour"),
        ([f"{PARTNER}.storage_root=relative/dir"], f"{PARTNER}.storage_root"),
        ([f"{PARTNER}.storage_root=nosuchproto://b/x"], f"{PARTNER}.storage_root"),
        ([f"{PARTNER}.storage_root=memory://x"], f"{PARTNER}.storage_root"),
        ([f"{PARTNER}.token_path=secrets/partner"], f"{PARTNER}.token_path"),
        ([f"{PARTNER}.token_env=PARTNER-TOKEN"], f"{PARTNER}.token_env"),
        (["fleet.lost_after_s=0"], "fleet.lost_after_s"),
        (["fleet.lost_after_s=nan"], "fleet.lost_after_s"),
        (["fleet.submit_deadline_s=-1"], "fleet.submit_deadline_s"),
        (["fleet.controller.port=0"], "fleet.controller.port"),
        (["fleet.controller.url=ftp://x"], "fleet.controller.url"),
        (["fleet.name=a/b"], "fleet.name"),
        # A credential among the public options would be copied into every run config.
        ([f"+{PARTNER}.storage_options.secret=abc"], f"{PARTNER}.storage_options.secret"),
        ([f"+{PARTNER}.storage_options.client_kwargs.aws_secret_access_key=abc"],
         f"{PARTNER}.storage_options.client_kwargs.aws_secret_access_key"),
    ],
)  # fmt: skip
def test_what_the_loop_tripped_over_is_refused_up_front(overrides, key):
    fleet = compose_run(["fleet=example_partner", *overrides]).fleet
    with pytest.raises(ConfigError) as err:
        validate_fleet(fleet)
    assert err.value.key == key
    assert "\n" not in str(err.value)
    # The controller, started with the fleet the CLI sends it, refuses it with the same line.
    with pytest.raises(ConfigError) as theirs:
        controller_fleet(OmegaConf.to_container(fleet), environ={})
    assert str(theirs.value) == str(err.value)


def test_a_local_lease_may_start_when_the_fleet_comes_up():
    for start in ("null", "+0s", "+5m"):
        validate_fleet(compose_run([f"{PARTNER}.lease_start={start}"]).fleet)
    with pytest.raises(ConfigError, match="is not after lease_start"):
        validate_fleet(
            compose_run([f"{PARTNER}.lease_start=+1h", f"{PARTNER}.lease_end=+30m"]).fleet
        )
    assert lease_window(None, "+30m", anchor=1000.0) == (1000.0, 2800.0)
    assert lease_window("+10s", "+30m", anchor=1000.0) == (1010.0, 2800.0)
    assert lease_window(None, None, anchor=1000.0) == (None, None)
    assert is_offset("+30m") and not is_offset("2026-12-01T00:00:00Z")


def test_the_controller_types_the_fleet_it_is_sent_and_names_the_key():
    fleet = OmegaConf.to_container(compose_run([]).fleet)
    assert controller_fleet(fleet, environ={}).clusters.partner.devices == 4
    fleet["clusters"]["home"]["devices"] = "many"
    with pytest.raises(ConfigError) as err:
        typed_fleet(fleet)
    assert err.value.key == "fleet.clusters.home.devices"
    fleet["clusters"]["home"] = {"devices": 2, "gpus": 1, "storage_root": "/x"}
    with pytest.raises(ConfigError) as err:
        typed_fleet(fleet)
    assert err.value.key == "fleet.clusters.home.gpus"
    assert "no such key (allowed: kind, local" in str(err.value)


def test_the_controller_needs_the_secrets_a_remote_cluster_names(tmp_path: Path):
    base = compose_run(["fleet=example_partner"]).fleet
    fleet = OmegaConf.to_container(base)
    with pytest.raises(ConfigError) as err:
        controller_fleet(fleet, environ={})
    assert err.value.key == "fleet.clusters.home.token_path"
    assert "no token file at ~/.spillway/secrets/home" in str(err.value)
    for name in ("home", "partner"):
        (tmp_path / name).write_text(f"{name}-token\n")
        fleet["clusters"][name]["token_path"] = str(tmp_path / name)
    with pytest.raises(ConfigError) as err:
        controller_fleet(fleet, environ={})
    assert err.value.key == "fleet.clusters.partner.storage_credentials_file"
    fleet["clusters"]["partner"].update(
        storage_credentials_file=None, storage_credentials_env="PARTNER_S3"
    )
    with pytest.raises(ConfigError) as err:
        controller_fleet(fleet, environ={})
    assert err.value.key == "fleet.clusters.partner.storage_credentials_env"
    creds = json.dumps({"key": "k", "secret": "s"})
    controller_fleet(fleet, environ={"PARTNER_S3": creds})
    # A token from a variable: named, it must be set where the controller runs.
    fleet["clusters"]["home"].update(token_path=None, token_env="HOME_TOKEN")
    with pytest.raises(ConfigError) as err:
        validate_fleet_sources(typed_fleet(fleet), environ={"PARTNER_S3": creds})
    assert err.value.key == "fleet.clusters.home.token_env"
    validate_fleet_sources(typed_fleet(fleet), environ={"PARTNER_S3": creds, "HOME_TOKEN": "t"})
    # A local cluster's token and keys come from `fleet up`: nothing to look for here.
    validate_fleet_sources(compose_run([]).fleet, environ={})


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
