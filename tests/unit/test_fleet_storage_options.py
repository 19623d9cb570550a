"""A cluster's storage options: merged from the config, its credentials source and the local S3
endpoint; a bad credentials source names its key. No server is started here."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from orchestrator.config import ConfigError, compose_run
from orchestrator.fleet import fleet as fleet_mod
from orchestrator.fleet.s3server import S3Server, record_path
from orchestrator.fleet.storage_options import (
    LOCAL_S3_DEFAULTS,
    merge_storage_options,
    read_credentials,
)

KEYS = {"key": "AKIDEXAMPLE", "secret": "s3cr3t"}


def test_secret_options_win_over_public_ones_and_nested_dicts_merge():
    merged = merge_storage_options(
        {"anon": False, "client_kwargs": {"region_name": "eu-west-1", "verify": False}},
        {"key": "k", "secret": "s", "client_kwargs": {"region_name": "us-east-2"}},
    )
    assert merged == {
        "anon": False,
        "key": "k",
        "secret": "s",
        "client_kwargs": {"region_name": "us-east-2", "verify": False},
    }


def test_a_local_endpoint_adds_bounded_timeouts_and_wins_over_the_configs_endpoint():
    merged = merge_storage_options(
        {"endpoint_url": "http://elsewhere", "config_kwargs": {"read_timeout": 5}},
        KEYS,
        "http://127.0.0.1:9000",
    )
    assert merged["endpoint_url"] == "http://127.0.0.1:9000"
    assert merged["config_kwargs"]["read_timeout"] == 5  # the config's own choice stays
    assert (
        merged["config_kwargs"]["connect_timeout"]
        == (LOCAL_S3_DEFAULTS["config_kwargs"]["connect_timeout"])
    )
    assert merged["key"] == "AKIDEXAMPLE"


def test_merging_leaves_its_inputs_alone():
    public = {"client_kwargs": {"verify": False}}
    merge_storage_options(public, {"client_kwargs": {"region_name": "x"}}, "http://127.0.0.1:1")
    assert public == {"client_kwargs": {"verify": False}}
    assert "region_name" not in LOCAL_S3_DEFAULTS.get("client_kwargs", {})


def test_credentials_come_from_a_file_or_a_variable(tmp_path):
    path = tmp_path / "creds.json"
    path.write_text(json.dumps(KEYS))
    assert read_credentials("fleet.clusters.p", str(path), None) == KEYS
    env = {"P_CREDS": json.dumps(KEYS)}
    assert read_credentials("fleet.clusters.p", None, "P_CREDS", env) == KEYS
    assert read_credentials("fleet.clusters.p", None, None) == {}


@pytest.mark.parametrize(
    ("content", "key"),
    [
        (None, "fleet.clusters.p.storage_credentials_file"),  # missing
        ("key=abc", "fleet.clusters.p.storage_credentials_file"),  # not JSON
        ('["a", "b"]', "fleet.clusters.p.storage_credentials_file"),  # not an object
    ],
)
def test_a_bad_credentials_file_names_its_key_and_never_quotes_the_file(tmp_path, content, key):
    path = tmp_path / "creds.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as err:
        read_credentials("fleet.clusters.p", str(path), None)
    assert err.value.key == key
    assert "abc" not in str(err.value)


@pytest.mark.parametrize("value", [None, "", "not json", "42"])
def test_a_bad_credentials_variable_names_its_key(value):
    env = {} if value is None else {"P_CREDS": value}
    with pytest.raises(ConfigError) as err:
        read_credentials("fleet.clusters.p", None, "P_CREDS", env)
    assert err.value.key == "fleet.clusters.p.storage_credentials_env"
    assert "not json" not in str(err.value)


def _views(state_dir, overrides=()):
    cfg = compose_run([f"state_dir={state_dir}", *overrides])
    return {v.name: v for v in fleet_mod.resolve(cfg.fleet, str(state_dir))}


def test_resolve_gives_the_local_s3_cluster_its_endpoint_and_keys_and_home_nothing(tmp_path):
    fdir = fleet_mod.fleet_dir(str(tmp_path), "local")
    creds = fdir / "s3" / "credentials.json"
    creds.parent.mkdir(parents=True)
    creds.write_text(json.dumps(KEYS))
    S3Server(1, 9123, str(creds), str(fdir / "s3" / "server.log"), 0.0).save(record_path(fdir))
    views = _views(tmp_path)
    assert views["home"].storage_options == {}
    options = views["partner"].storage_options
    assert options["endpoint_url"] == "http://127.0.0.1:9123"
    assert (options["key"], options["secret"]) == (KEYS["key"], KEYS["secret"])
    assert "s3cr3t" not in repr(views["partner"])


def test_before_fleet_up_a_local_s3_cluster_has_no_endpoint_and_resolve_does_not_fail(tmp_path):
    assert _views(tmp_path)["partner"].storage_options == {}


def test_resolve_refuses_a_remote_clusters_missing_credentials_file_by_its_key(tmp_path):
    overrides = [f"fleet.clusters.home.storage_credentials_file={tmp_path}/absent.json"]
    with pytest.raises(ConfigError) as err:
        _views(tmp_path, overrides)
    assert err.value.key == "fleet.clusters.home.storage_credentials_file"


def test_the_run_config_names_where_the_keys_are_never_the_keys(tmp_path):
    cfg = compose_run([f"state_dir={tmp_path}"])
    partner = cfg.fleet.clusters.partner
    assert partner.storage_credentials_file == f"{tmp_path}/fleet/local/s3/credentials.json"
    assert set(OmegaConf.to_container(partner.storage_options)) == set()
