"""The local partner behaves like another machine: isolated, two nodes, its own bucket.

One fleet comes up on a fresh SPILLWAY_HOME; jobs submitted through the partner's own Jobs API
report what the partner sees, and the controller's side reaches the same bucket."""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from ray.job_submission import JobSubmissionClient

from orchestrator.checkpoint.storage import open_root
from orchestrator.config import compose_run
from orchestrator.fleet import fleet as fleet_mod
from orchestrator.fleet.local import LocalCluster
from orchestrator.fleet.processes import session_pids
from orchestrator.fleet.s3server import S3Server, credentials_path, record_path
from orchestrator.fleet.tokens import auth_headers, read_token

pytestmark = pytest.mark.slow

ORCHESTRATOR = Path(__file__).resolve().parents[2] / "orchestrator"

# What a job on the partner sees. Values of the environment are reported as digests only.
PROBE = r"""
import hashlib, importlib, json, os, sys
import fsspec, ray
paths = json.loads(sys.argv[1])
out = {"exists": {name: os.path.exists(p) for name, p in paths.items()}}
out["imports"] = {}
for module in ("orchestrator", "orchestrator.fleet", "recipes"):
    try:
        importlib.import_module(module)
        out["imports"][module] = "imported"
    except ImportError as exc:
        out["imports"][module] = type(exc).__name__
out["env"] = sorted(os.environ)
out["env_digests"] = [hashlib.sha256(v.encode()).hexdigest() for v in os.environ.values()]
ray.init(address="auto")
alive = [n for n in ray.nodes() if n["Alive"]]
out["nodes"] = [n["NodeManagerAddress"] for n in alive]
out["devices"] = sum(n["Resources"].get("spillway_device", 0) for n in alive)
with fsspec.open("s3://spillway-partner/probe/from-partner", "w") as f:
    f.write("written on the partner")
with fsspec.open("s3://spillway-partner/probe/from-partner") as f:
    out["bucket"] = f.read().decode()
print("PROBE " + json.dumps(out))
"""

# The same partner, given Spillway through the job's runtime_env, reads what home wrote.
SHIPPED = r"""
import json, fsspec, orchestrator.fleet.leases as leases
with fsspec.open("s3://spillway-partner/probe/from-home") as f:
    print("SHIPPED " + json.dumps({"module": leases.__file__, "bucket": f.read().decode()}))
"""


def run_job(client: JobSubmissionClient, code: str, *args: str, **submit) -> dict:
    argv = " ".join(shlex.quote(a) for a in (sys.executable, "-c", code, *args))
    job = client.submit_job(entrypoint=argv, **submit)
    deadline = time.monotonic() + 60
    while not client.get_job_status(job).is_terminal():
        assert time.monotonic() < deadline, "the probe job did not finish within 60s"
        time.sleep(0.3)
    logs = client.get_job_logs(job)
    assert str(client.get_job_status(job)) == "SUCCEEDED", logs[-3000:]
    line = next(x for x in logs.splitlines() if x.startswith(("PROBE ", "SHIPPED ")))
    return json.loads(line.split(" ", 1)[1])


def record(home: Path, name: str) -> LocalCluster:
    return LocalCluster.load(home / "fleet" / "local" / f"{name}.json")


def environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone meanwhile
        return b""


def test_the_partner_is_another_machine_with_its_own_bucket(spillway, fleet_home, monkeypatch):
    # A credential of the caller's that no cluster has any use for.
    monkeypatch.setenv("UNRELATED_API_KEY", "caller-only-0f9e8d")
    # Things the partner must not see, made first so that seeing them could be reported.
    (fleet_home / "controller.db").write_text("the controller's state")
    home_storage = fleet_home / "storage" / "home"
    home_storage.mkdir(parents=True)
    (home_storage / "marker").write_text("home's disk")

    up = spillway("fleet", "up")
    assert up.returncode == 0, up.stderr[-3000:]
    assert "unisolated" not in up.stderr  # the tests require isolation (CI runs as root)
    home, partner = record(fleet_home, "home"), record(fleet_home, "partner")
    assert partner.isolated and partner.nodes == 2
    assert not home.isolated and home.nodes == 1
    fdir = fleet_home / "fleet" / "local"
    server = S3Server.load(record_path(fdir))
    assert server is not None and server.is_running()
    creds = credentials_path(fdir)
    assert creds.stat().st_mode & 0o777 == 0o600
    secret = json.loads(creds.read_text())["secret"]

    again = spillway("fleet", "up")
    assert again.returncode == 0, again.stderr[-3000:]
    assert [line.split()[2] for line in again.stdout.splitlines()[1:3]] == ["running", "running"]
    assert S3Server.load(record_path(fdir)).session_id == server.session_id

    # Only what a cluster needs reaches its processes: nothing of the caller's own, and
    # the partner never gets home's token.
    for rec in (home, partner):
        for pid in session_pids(rec.session_id):
            assert b"caller-only-0f9e8d" not in environ(pid), f"{rec.name} pid {pid}"
    for pid in session_pids(partner.session_id):
        assert home.token_path.encode() not in environ(pid)

    client = JobSubmissionClient(
        partner.dashboard_url, headers=auth_headers(read_token(partner.token_path, None))
    )
    hidden = {
        "controller.db": str(fleet_home / "controller.db"),
        "home storage": str(home_storage),
        "home token": str(fdir / "home" / "token"),
        "s3 credentials": str(creds),
        "sources": str(ORCHESTRATOR / "fleet" / "fleet.py"),
    }
    seen = run_job(client, PROBE, json.dumps(hidden))
    assert seen["exists"] == dict.fromkeys(hidden, False)
    assert seen["imports"] == dict.fromkeys(("orchestrator", "orchestrator.fleet", "recipes"),
                                            "ModuleNotFoundError")  # fmt: skip
    aws = {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}
    assert aws <= set(seen["env"])
    assert "SPILLWAY_HOME" not in seen["env"]
    home_token = Path(home.token_path).read_text().strip()
    assert hashlib.sha256(home_token.encode()).hexdigest() not in seen["env_digests"]
    assert seen["nodes"] == ["127.0.0.1", "127.0.0.1"]
    assert seen["devices"] == 4
    assert seen["bucket"] == "written on the partner"

    # The controller's side: the partner's view opens the same bucket with its storage options.
    cfg = compose_run([f"state_dir={fleet_home}"])
    views = {v.name: v for v in fleet_mod.resolve(cfg.fleet, str(fleet_home))}
    fs, root = open_root(views["partner"].storage_root, views["partner"].storage_options)
    assert root.startswith("spillway-partner")
    assert fs.cat_file("spillway-partner/probe/from-partner") == b"written on the partner"
    fs.pipe_file("spillway-partner/probe/from-home", b"written at home")
    assert views["home"].storage_options == {}

    shipped = run_job(client, SHIPPED, runtime_env={"py_modules": [str(ORCHESTRATOR)]})
    assert shipped["bucket"] == "written at home"
    assert not shipped["module"].startswith(str(ORCHESTRATOR))  # the shipped copy, not ours
    assert shipped["module"].startswith(partner.temp_dir)

    status = spillway.json("fleet", "status")
    assert {c["name"]: c["devices_total"] for c in status["clusters"]} == {"home": 2, "partner": 4}

    # The keys live in their 0600 file and nowhere else under the state dir: not in the run
    # config, no cluster's logs, the S3 server's log or the records.
    assert secret not in OmegaConf.to_yaml(cfg)
    for path in fleet_home.rglob("*"):
        if path.is_file() and not path.is_symlink() and path != creds:
            assert secret.encode() not in path.read_bytes(), f"the S3 secret is in {path}"

    down = spillway("fleet", "down")
    assert down.returncode == 0, down.stderr[-3000:]
    for name, sid in (("home", home.session_id), ("partner", partner.session_id),
                      ("s3 server", server.session_id)):  # fmt: skip
        assert session_pids(sid) == [], f"{name} left processes behind"
    assert not creds.exists() and not record_path(fdir).exists()
