"""Secrets stay where they belong: the scan the e2e tests run (tests/secrets_scan.py) finds a
secret in any kind of file, and a run config composed and stored with every secret of its
fleet within reach of the process holds none of them."""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import stat
import tempfile
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from orchestrator.api import discovery
from orchestrator.api.run_config import typed_run_config
from orchestrator.config import compose_run
from orchestrator.controller.jobs import job_record
from orchestrator.controller.state import ControllerState
from orchestrator.fleet import fleet as fleet_mod
from orchestrator.fleet.local import LocalCluster
from orchestrator.fleet.s3server import S3Server, credentials_path, new_credentials_file
from orchestrator.fleet.tokens import new_token_file
from tests.secrets_scan import CHUNK, find_secrets, fleet_secrets, secret_files

SECRETS = {"ray": "ray-" + secrets.token_hex(16), "s3": "s3-" + secrets.token_urlsafe(20)}


@pytest.fixture()
def planted(spillway_home: Path) -> Path:
    """A fresh directory under SPILLWAY_HOME, where all of a test's files belong."""
    return Path(tempfile.mkdtemp(prefix="planted-", dir=spillway_home))


def test_a_secret_is_found_in_text_binary_sqlite_and_its_wal(planted: Path) -> None:
    (planted / "log.txt").write_text(f"connecting with Bearer {SECRETS['ray']}\n")
    (planted / "deep" / "er").mkdir(parents=True)
    blob = os.urandom(5000) + SECRETS["s3"].encode() + os.urandom(5000)
    (planted / "deep" / "er" / "shard.bin").write_bytes(blob)
    # Across the scan's chunk boundary: found by the overlap between chunks.
    edge = CHUNK - len(SECRETS["ray"]) // 2
    (planted / "big.bin").write_bytes(b"\0" * edge + SECRETS["ray"].encode() + b"\0" * 100)
    (planted / "clean.bin").write_bytes(os.urandom(20000))
    os.mkfifo(planted / "a-fifo")  # opening it would block: never read

    closed = sqlite3.connect(planted / "closed.db")
    closed.execute("CREATE TABLE jobs (id TEXT, run_config BLOB)")
    closed.execute("INSERT INTO jobs VALUES (?, ?)", ("j-1", json.dumps({"t": SECRETS["s3"]})))
    closed.commit()
    closed.close()
    # A database still open in WAL mode: the committed row is in the -wal file, not the db.
    live = sqlite3.connect(planted / "live.db")
    live.execute("PRAGMA journal_mode=WAL")
    live.execute("PRAGMA wal_autocheckpoint=0")
    live.execute("CREATE TABLE events (cause TEXT)")
    live.commit()
    live.execute("INSERT INTO events VALUES (?)", (f"token {SECRETS['ray']}",))
    live.commit()
    try:
        assert (planted / "live.db-wal").stat().st_size > 0
        assert SECRETS["ray"].encode() not in (planted / "live.db").read_bytes()
        found = find_secrets([planted], SECRETS, allowed=set())
    finally:
        live.close()
    assert found == sorted(
        [
            (planted / "big.bin", "ray"),
            (planted / "closed.db", "s3"),
            (planted / "deep" / "er" / "shard.bin", "s3"),
            (planted / "live.db-wal", "ray"),
            (planted / "log.txt", "ray"),
        ]
    )


def test_allowed_files_and_directories_are_not_reported(planted: Path) -> None:
    token = planted / "fleet" / "home" / "token"
    token.parent.mkdir(parents=True)
    token.write_text(SECRETS["ray"])
    (planted / "keys").mkdir()
    (planted / "keys" / "credentials.json").write_text(json.dumps({"secret": SECRETS["s3"]}))
    leak = planted / "controller.log"
    leak.write_text(f"oops {SECRETS['s3']}")
    allowed = {token, planted / "keys"}
    assert find_secrets([planted], SECRETS, allowed) == [(leak, "s3")]
    leak.unlink()
    assert find_secrets([planted], SECRETS, allowed) == []
    assert find_secrets([planted], {"empty": ""}, set()) == [], "an empty value is no secret"


def test_fleet_secrets_are_what_fleet_up_and_launch_wrote(planted: Path) -> None:
    """Made by the writers the fleet uses: cluster token files and records, the API's token,
    the S3 server's keys. Each file holding a secret is its owner's alone (0600)."""
    fdir = planted / "fleet" / "local"
    tokens = {}
    for name in ("home", "partner"):
        token = new_token_file(fdir / name / "token")
        tokens[name] = token.read_text()
        LocalCluster(name, 1, 2, 3, 4, 5, str(planted / "ray" / name), str(token),
                     str(fdir / name / "ray-start.log"), time.time()).save(fdir / f"{name}.json")  # fmt: skip
    api = discovery.local_controller(str(planted), "local", create=True)
    creds = new_credentials_file(credentials_path(fdir))
    S3Server(1, 9000, str(creds), str(fdir / "s3" / "server.log"), time.time()).save(
        fdir / "s3" / "server.json"
    )
    keys = json.loads(creds.read_text())

    found = fleet_secrets(planted)
    assert found == {
        "local/home ray token": tokens["home"],
        "local/partner ray token": tokens["partner"],
        "local/api token": Path(api.token_path).read_text(),
        "local/s3 key": keys["key"],
        "local/s3 secret": keys["secret"],
    }
    for path in (fdir / "home" / "token", fdir / "partner" / "token", api.token_path, creds):
        assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600, path
    owners = {fdir / "home" / "token", fdir / "partner" / "token", Path(api.token_path), creds}
    assert secret_files(planted) == owners
    assert find_secrets([planted], found, owners) == [], "a secret outside its own file"
    (fdir / "home" / "ray-start.log").write_text(f"auth {tokens['partner']}\n")
    assert find_secrets([planted], found, owners) == [
        (fdir / "home" / "ray-start.log", "local/partner ray token")
    ]


# ---- a run config holds no secret ---------------------------------------------------------

ENV = {
    "HOME_RAY_TOKEN": "home-" + secrets.token_hex(24),
    "PARTNER_RAY_TOKEN": "partner-" + secrets.token_hex(24),
    "SPILLWAY_API_TOKEN": "api-" + secrets.token_hex(24),
    "PARTNER_KEY": "AKIA" + secrets.token_hex(8).upper(),
    "PARTNER_SECRET": secrets.token_urlsafe(30),
}
OVERRIDES = [
    "fleet=example_partner", "data=synthetic", "trainer.max_steps=20",
    "fleet.controller.token_path=null", "fleet.controller.token_env=SPILLWAY_API_TOKEN",
    "fleet.clusters.home.token_path=null", "fleet.clusters.home.token_env=HOME_RAY_TOKEN",
    "fleet.clusters.partner.token_path=null", "fleet.clusters.partner.token_env=PARTNER_RAY_TOKEN",
    "fleet.clusters.partner.storage_credentials_file=null",
    "fleet.clusters.partner.storage_credentials_env=PARTNER_S3_CREDENTIALS",
]  # fmt: skip


def test_a_stored_run_config_holds_none_of_its_fleets_secrets(
    monkeypatch: pytest.MonkeyPatch, planted: Path
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    creds = {"key": ENV["PARTNER_KEY"], "secret": ENV["PARTNER_SECRET"]}
    monkeypatch.setenv("PARTNER_S3_CREDENTIALS", json.dumps(creds))
    state_dir = planted
    cfg = compose_run(OVERRIDES)
    # Every secret is within the process's reach: the fleet reads them when it resolves.
    views = {v.name: v for v in fleet_mod.resolve(cfg.fleet, str(state_dir))}
    assert views["home"].token == ENV["HOME_RAY_TOKEN"]
    assert views["partner"].token == ENV["PARTNER_RAY_TOKEN"]
    assert views["partner"].storage_options["secret"] == ENV["PARTNER_SECRET"]

    # What the controller stores: the client's run config, typed and pinned by the API.
    stored = typed_run_config(OmegaConf.to_container(cfg), cfg.fleet, str(state_dir))
    record = job_record("j-secrets", stored, OVERRIDES)
    for name, value in ENV.items():
        assert value not in record.run_config, f"{name} is in the run config"
        assert value not in json.dumps(record.overrides), name
    assert json.loads(record.run_config)["fleet"]["clusters"]["partner"]["token_env"] == (
        "PARTNER_RAY_TOKEN"
    ), "the config names where a token comes from"
    state = ControllerState.open(state_dir / "controller.db")
    try:
        state.add_job(record, time.time())
        # Raw bytes of the database and its -wal while the state is open, then after.
        assert find_secrets([state_dir], ENV, allowed=set()) == []
    finally:
        state.close()
    assert find_secrets([state_dir], ENV, allowed=set()) == []
    assert (state_dir / "controller.db").stat().st_size > 0
