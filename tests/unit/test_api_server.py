"""The controller's HTTP API through the real client: a real aiohttp server on 127.0.0.1
around a real Controller (and its reconcile loop) whose clusters are never started."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from orchestrator.api import server as server_mod
from orchestrator.api.client import (
    ApiClient,
    ApiError,
    Endpoint,
    Rejected,
    Unauthorized,
    Unreachable,
)
from orchestrator.api.server import ApiServer
from orchestrator.commands import jobs as job_cmds
from orchestrator.config import compose_run
from orchestrator.controller.paths import run_files
from orchestrator.fleet.local import free_ports
from tests.api_controller import Running, start


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory):
    # A long poll interval: anything that happens within seconds was woken by a request.
    controller = start(tmp_path_factory.mktemp("api"), poll_s=60.0)
    yield controller
    controller.actor.close()


@pytest.fixture(scope="module")
def run_config() -> dict:
    return OmegaConf.to_container(
        compose_run(["data=synthetic", "data.seq_len=32", "trainer.max_steps=20"])
    )


@pytest.fixture()
def client(running: Running) -> ApiClient:
    return running.client()


def raw(url: str, headers: dict | None = None, method: str = "GET") -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def test_health_needs_the_token(running: Running) -> None:
    health = f"{running.url}/v1/health"
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": running.token}):
        status, head, body = raw(health, headers)
        assert status == 401, headers
        assert head["WWW-Authenticate"].startswith("Bearer")
        assert body["error"]["status"] == 401
    status, _, body = raw(health, {"Authorization": f"Bearer {running.token}"})
    assert status == 200
    assert body["fleet"] == "local" and body["pid"] > 0 and body["started_at"] > 0
    # Every route is behind the token, unknown ones too: nothing is learnt without it.
    assert raw(f"{running.url}/v1/jobs/j-x")[0] == 401
    assert raw(f"{running.url}/v1/nothing-here")[0] == 401


def test_a_wrong_token_is_one_line_naming_where_it_came_from(
    running: Running, tmp_path: Path
) -> None:
    wrong = tmp_path / "token"
    wrong.write_text("not-the-token")
    client = ApiClient(Endpoint(url=running.url, token_path=str(wrong), source="client.json"))
    with pytest.raises(Unauthorized) as refused:
        client.jobs()
    line = str(refused.value)
    assert "\n" not in line and "refused the token (401)" in line
    assert str(wrong) in line and "client.json" in line


def test_launch_list_get_and_the_wake(client: ApiClient, run_config: dict) -> None:
    job_id = client.submit(run_config, ["data=synthetic"])
    assert job_id.startswith("j-")
    assert job_id in [j["job_id"] for j in client.jobs()]
    info = client.job(job_id)
    assert info["state"] == "PENDING" and info["attempts"] == []
    assert info["overrides"] == ["data=synthetic"]
    assert info["events"][0]["to"] == "PENDING"
    # The loop ticks every 60 s; the launch woke it, so placement has already looked at the job.
    deadline = time.monotonic() + 5
    while client.job(job_id)["reason"] == "submitted" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.job(job_id)["reason"] != "submitted", "the launch did not wake the loop"
    # Its clusters do not exist: not yet heard from, or (5 s of refused probes on) lost.
    reason = client.job(job_id)["reason"]
    assert "unreachable" in reason or reason.startswith("waiting for an answer from"), reason


def test_the_stored_run_config_is_pinned_to_the_controllers_fleet(
    running: Running, client: ApiClient, run_config: dict
) -> None:
    job_id = client.submit({**run_config, "state_dir": "/elsewhere"}, [])
    stored = json.loads(running.actor.controller.state.get_job(job_id).run_config)
    assert stored["state_dir"] == running.actor.controller.state_dir
    assert stored["fleet"]["clusters"]["partner"]["devices"] == 2  # the controller's, not 4


def test_cancel_then_resume(client: ApiClient, run_config: dict) -> None:
    job_id = client.submit(run_config, [])
    with pytest.raises(Rejected) as refused:
        client.resume(job_id, run_config, [])
    assert refused.value.status == 409 and "only a finished, failed or cancelled" in str(
        refused.value
    )
    assert client.cancel(job_id)["state"] == "CANCELLED"
    assert client.cancel(job_id)["state"] == "CANCELLED"  # a second cancel changes nothing
    resumed = client.resume(job_id, run_config, ["trainer.max_steps=40"])
    assert resumed["state"] == "PENDING"
    assert client.job(job_id)["overrides"] == ["trainer.max_steps=40"]


def test_migrate_is_refused_unless_running_and_for_an_unknown_cluster(
    client: ApiClient, run_config: dict
) -> None:
    job_id = client.submit(run_config, [])
    with pytest.raises(Rejected) as not_running:
        client.migrate(job_id, "partner")
    assert not_running.value.status == 409
    assert str(not_running.value) == f"job {job_id} is PENDING; only a running job migrates"
    with pytest.raises(Rejected) as unknown:
        client.migrate(job_id, "mars")
    assert unknown.value.status == 400 and unknown.value.key == "to"
    assert "(allowed: home, partner)" in str(unknown.value)
    assert client.job(job_id)["state"] == "PENDING"


def test_an_unknown_job_is_404_on_every_route(client: ApiClient, run_config: dict) -> None:
    for call in (
        lambda: client.job("j-nope"),
        lambda: client.progress("j-nope"),
        lambda: client.metrics("j-nope"),
        lambda: client.logs("j-nope"),
        lambda: client.cancel("j-nope"),
        lambda: client.migrate("j-nope", "home"),
        lambda: client.resume("j-nope", run_config, []),
    ):
        with pytest.raises(Rejected) as refused:
            call()
        assert refused.value.status == 404 and str(refused.value) == "no job j-nope"
    with pytest.raises(Rejected) as route:
        client.request("GET", "/no-such-route")
    assert route.value.status == 404


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda c: c["trainer"].update(foo=1), "trainer.foo"),
        (lambda c: c["trainer"].update(max_steps="many"), "trainer.max_steps"),
        (lambda c: c["model"].pop("dim"), "model.dim"),
        (lambda c: c["fleet"].update(name="elsewhere"), "fleet"),
        # The client's fleet has a 4-device partner; this controller's largest cluster has 2.
        (lambda c: c["resources"].update(devices=4), "resources.devices"),
        (lambda c: c["optim"].update(lr=0.0), "optim.lr"),
    ],
)
def test_a_run_config_off_the_schema_is_400_naming_the_key(
    client: ApiClient, run_config: dict, change, key: str
) -> None:
    before = len(client.jobs())
    bad = json.loads(json.dumps(run_config))
    change(bad)
    with pytest.raises(Rejected) as refused:
        client.submit(bad, [])
    assert refused.value.status == 400 and refused.value.key == key
    assert str(refused.value).startswith(f"bad config: {key}: ")
    assert len(client.jobs()) == before, "a refused launch recorded a job"


def test_a_body_that_is_not_the_routes_is_400(client: ApiClient, run_config: dict) -> None:
    for body, key in (
        ([1, 2], "body"),
        ({"overrides": []}, "run_config"),
        ({"run_config": run_config, "overrides": "trainer.max_steps=3"}, "overrides"),
        ({"run_config": "text", "overrides": []}, "run_config"),
    ):
        with pytest.raises(Rejected) as refused:
            client.request("POST", "/jobs", body)
        assert (refused.value.status, refused.value.key) == (400, key)


def test_progress_metrics_and_logs_read_the_run_files(
    running: Running, client: ApiClient, run_config: dict
) -> None:
    job_id = client.submit(run_config, [])
    progress = client.progress(job_id)
    assert (progress["state"], progress["max_steps"], progress["step"]) == ("PENDING", 20, None)
    with pytest.raises(Rejected) as not_started:
        client.logs(job_id)
    assert not_started.value.status == 409 and "has not started yet" in str(not_started.value)

    # What a rank 0 on home would have written: metrics segments in the attempt's run dir.
    controller = running.actor.controller
    attempt = controller.state.add_attempt(job_id, "home", 2, time.time())
    spool = run_files(controller.clusters()["home"], job_id, attempt.attempt).metrics_writer()
    for step in (1, 2, 3):
        spool.write({"step": step, "loss": 5.0 - step, "lr": 1e-3, "world_size": 2,
                     "tokens_per_s": 100.0, "time": time.time()})  # fmt: skip
    spool.close()
    lines = client.metrics(job_id)
    assert [(r["step"], r["attempt"], r["cluster"]) for r in lines] == [
        (1, 1, "home"),
        (2, 1, "home"),
        (3, 1, "home"),
    ]
    progress = client.progress(job_id)
    assert (progress["step"], progress["loss"], progress["cluster"]) == (3, 2.0, "home")


def test_a_write_the_loop_holds_up_is_refused_unapplied(
    running: Running, client: ApiClient, run_config: dict, monkeypatch
) -> None:
    monkeypatch.setattr(server_mod, "LOCK_WAIT_S", 0.3)
    before = len(client.jobs())
    lock = running.actor.controller.lock
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(5)
    try:
        with pytest.raises(Unreachable, match="held the controller"):
            client.submit(run_config, [])
        assert len(client.jobs()) == before, "reads need no lock; the write changed nothing"
    finally:
        release.set()
        holder.join()
    assert client.submit(run_config, [])


def test_an_unreachable_controller_is_one_line_naming_the_url(running: Running) -> None:
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    client = ApiClient(Endpoint(url=url, token_path=running.endpoint.token_path))
    with pytest.raises(Unreachable) as refused:
        client.jobs()
    line = str(refused.value)
    assert line.startswith(f"cannot reach the controller at {url} (") and "\n" not in line


def test_a_port_that_is_taken_fails_the_start(running: Running) -> None:
    port = int(running.url.rsplit(":", 1)[1])
    second = ApiServer(running.actor.controller, "t", "127.0.0.1", port, lambda: None, {})
    with pytest.raises(RuntimeError, match=f"cannot listen on http://127.0.0.1:{port}"):
        second.start()
    second.stop()


def test_wait_rides_out_a_controller_that_goes_away_and_comes_back(
    running: Running, run_config: dict, monkeypatch
) -> None:
    """As after a kill -9: Ray restarts the actor and its API listens on the same port again."""
    controller = running.actor.controller
    job_id = running.client().submit(run_config, [])
    (port,) = free_ports(1)
    token = running.token
    first = ApiServer(controller, token, "127.0.0.1", port, lambda: None, {})
    first.start()
    client = ApiClient(Endpoint(url=first.url, token_path=running.endpoint.token_path))
    first.stop()
    monkeypatch.setattr(job_cmds, "POLL_S", 0.2)
    again: list[ApiServer] = []

    def come_back() -> None:
        time.sleep(1.5)
        again.append(ApiServer(controller, token, "127.0.0.1", port, lambda: None, {}))
        again[0].start()

    threading.Thread(target=come_back).start()
    try:
        # The job never runs (no cluster is up): the timeout, not the outage, ends the wait.
        assert job_cmds.follow(client, job_id, timeout_s=3.0) == 124
    finally:
        time.sleep(0.1)
        for server in again:
            server.stop()
    monkeypatch.setattr(job_cmds, "RIDE_OUT_S", 0.5)
    with pytest.raises(Unreachable, match="of failed requests"):
        job_cmds.follow(client, job_id, timeout_s=5.0)


def test_no_token_means_no_server(running: Running) -> None:
    with pytest.raises(ValueError, match="never serves unauthenticated"):
        ApiServer(running.actor.controller, "", "127.0.0.1", 0, lambda: None, {})


def test_a_client_without_its_token_sends_nothing(tmp_path: Path) -> None:
    endpoint = Endpoint(url="http://127.0.0.1:1", token_path=str(tmp_path / "absent"))
    with pytest.raises(ApiError, match="no token for the controller at http://127.0.0.1:1"):
        ApiClient(endpoint)
