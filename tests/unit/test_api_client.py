"""The client's side, without a server: when a token may be sent, and where the CLI finds the
controller (client.json, the fleet's controller.url, the local fleet's record)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from orchestrator.api import discovery
from orchestrator.api.client import ApiClient, ApiError, Endpoint, check_transport, is_loopback
from orchestrator.config.schema import FleetConfig


def fleet(name: str = "local", home_local: bool = True, **controller) -> OmegaConf:
    return OmegaConf.merge(
        OmegaConf.structured(FleetConfig),
        {
            "name": name,
            "controller": controller,
            "clusters": {"home": {"kind": "owned", "local": home_local, "storage_root": "/s"}},
        },
    )


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.0.2", True), ("::1", True), ("localhost", True),
     ("10.0.0.5", False), ("192.168.1.2", False), ("controller.example", False)],
)  # fmt: skip
def test_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_plain_http_to_another_host_is_refused_unless_insecure_http() -> None:
    check_transport(Endpoint(url="http://127.0.0.1:8080"))
    check_transport(Endpoint(url="https://controller.example:8443"))
    check_transport(Endpoint(url="http://10.0.0.5:8080", insecure_http=True))
    with pytest.raises(ApiError) as refused:
        check_transport(Endpoint(url="http://10.0.0.5:8080", source="/h/client.json"))
    line = str(refused.value)
    assert "refusing to send the controller's token over plain http to 10.0.0.5" in line
    assert "/h/client.json" in line and "insecure_http: true" in line and "\n" not in line
    with pytest.raises(ApiError, match="is not an http"):
        check_transport(Endpoint(url="ftp://127.0.0.1/x"))


def test_the_client_refuses_before_it_has_a_connection(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("secret")
    # The refusal comes from the constructor: no request can have been made.
    with pytest.raises(ApiError, match="plain http"):
        ApiClient(Endpoint(url="http://controller.invalid:8080", token_path=str(token)))


def test_client_json_is_read_and_refused_key_by_key(tmp_path: Path) -> None:
    assert discovery.read_client_file(str(tmp_path)) is None
    path = tmp_path / "client.json"
    path.write_text(json.dumps({"url": "http://127.0.0.1:5", "token_path": "tok"}))
    found = discovery.read_client_file(str(tmp_path))
    assert found.url == "http://127.0.0.1:5" and found.fleet is None
    assert found.token_path == str(tmp_path / "tok"), "relative to the file"
    assert found.source == str(path)
    for data, words in (
        ({"url": "http://x", "token_path": "t", "tokn": 1}, "tokn: no such key"),
        ({"token_path": "t"}, "url: is required"),
        ({"url": "http://x"}, "token_path or token_env"),
        ({"url": "http://x", "token_env": "T", "insecure_http": "yes"}, "insecure_http: must be"),
        ([1], "must be a JSON object"),
    ):
        path.write_text(json.dumps(data))
        with pytest.raises(ApiError, match=words):
            discovery.read_client_file(str(tmp_path))
    path.write_text("{")
    with pytest.raises(ApiError, match="not JSON"):
        discovery.read_client_file(str(tmp_path))


def test_the_order_client_json_then_controller_url_then_the_local_record(tmp_path: Path) -> None:
    home = str(tmp_path)
    local, remote = fleet(), fleet("far", home_local=False, url="https://c.example", token_env="T")
    assert discovery.find(home, local) is None, "nothing is created by finding"
    assert not (tmp_path / "fleet").exists()

    record = discovery.local_controller(home, "local", create=True)
    assert discovery.find(home, local).url == record.url
    assert discovery.find(home, remote).url == "https://c.example"
    assert discovery.find(home, None) is None

    discovery.write_client_file(
        home, Endpoint(url="http://127.0.0.1:9", token_env="X", fleet="far")
    )
    assert discovery.find(home, None).url == "http://127.0.0.1:9"
    assert discovery.find(home, remote).url == "http://127.0.0.1:9"
    # A client.json recorded for another fleet does not apply to this one.
    assert discovery.find(home, local).url == record.url

    # One written by hand (no fleet) applies to every command and is never overwritten.
    (tmp_path / "client.json").write_text(json.dumps({"url": "https://mine", "token_env": "M"}))
    assert discovery.find(home, local).url == "https://mine"
    assert not discovery.write_client_file(home, record.endpoint())
    assert discovery.find(home, remote).url == "https://mine"


def test_the_local_record_is_made_once_and_reused(tmp_path: Path) -> None:
    home = str(tmp_path)
    assert discovery.local_controller(home, "local", create=False) is None
    made = discovery.local_controller(home, "local", create=True)
    again = discovery.local_controller(home, "local", create=True)
    assert again == made and made.url.startswith("http://127.0.0.1:")
    token = Path(made.token_path)
    assert token.parent == tmp_path / "fleet" / "local" / "controller"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64
    # client.json written for it is recognised as this home's, the record lost or not.
    assert discovery.is_local_fleets(made.endpoint(), home, "local")
    assert not discovery.is_local_fleets(made.endpoint(), str(tmp_path / "laptop"), "local")
    copied = Endpoint(url=made.url, token_path=str(tmp_path / "copy"), source="client.json")
    assert not discovery.is_local_fleets(copied, home, "local")
    boot = made.fleet_config({"name": "local", "controller": {"token_env": "X"}, "clusters": {}})
    assert boot["controller"] == {
        "url": made.url, "host": "127.0.0.1", "port": made.port,
        "token_path": made.token_path, "token_env": None,
    }  # fmt: skip


def test_fleet_up_records_client_json_for_the_local_fleet_only(tmp_path: Path) -> None:
    assert discovery.record_local_fleet(str(tmp_path), fleet("far", home_local=False)) is None
    assert not (tmp_path / "client.json").exists()
    endpoint = discovery.record_local_fleet(str(tmp_path), fleet())
    data = json.loads((tmp_path / "client.json").read_text())
    assert data["url"] == endpoint.url and data["fleet"] == "local"
    assert data["token_path"] == endpoint.token_path
    assert "token" not in data, "client.json names where the token is, never the token"
