"""Real recipe runs that fail, read the way a rank reads them: orchestrator.runtime.rank's
train_rank (what RankActor.run calls) in one process of its own, without Ray, and the driver's
exit code from the results it returns."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import exit_codes
from orchestrator.runtime.driver import exit_code_for
from tests.integration.recipe_runs import BASE, REPO

pytestmark = pytest.mark.slow

# Runs each case as rank 0 of 1 in turn and prints its result as one JSON line. For
# "lose_storage" a thread waits for the first committed checkpoint and then puts a regular
# file where the checkpoint directory was (root ignores a chmod): every later save fails.
_CASES = """
import json, os, shutil, socket, sys, threading, time
import torch.distributed as dist
from omegaconf import OmegaConf
from orchestrator.config import compose_run
from orchestrator.rundir import RunDir
from orchestrator.runtime.rank import train_rank

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def lose_storage_after_first_commit(run_dir, storage, stop):
    while not stop.is_set():
        if RunDir(run_dir).last_save() is not None:
            os.rename(storage, storage + ".gone")
            with open(storage, "w") as f:
                f.write("not a directory")
            return
        time.sleep(0.01)

for case in json.loads(sys.argv[1]):
    cfg = OmegaConf.to_container(compose_run(case["overrides"]), resolve=True)
    stop = threading.Event()
    if case.get("lose_storage"):
        args = (cfg["run_dir"], cfg["checkpoint"]["storage"], stop)
        threading.Thread(target=lose_storage_after_first_commit, args=args, daemon=True).start()
    result = train_rank(0, 1, ("127.0.0.1", free_port()), cfg)
    stop.set()
    if dist.is_initialized():  # a failed recipe leaves its process group behind
        dist.destroy_process_group()
    print(json.dumps({"name": case["name"], "result": result}), flush=True)
"""


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("failure_codes")


@pytest.fixture(scope="module")
def results(root: Path) -> dict[str, dict]:
    cases = [
        {
            "name": "storage lost mid-run",
            "lose_storage": True,
            "overrides": [
                *BASE,
                "trainer.max_steps=400",
                "checkpoint.every_steps=2",
                f"run_dir={root / 'lost'}",
            ],
        },
        {
            "name": "object store unreachable",
            "overrides": [
                *BASE,
                f"run_dir={root / 's3'}",
                "checkpoint.storage=s3://spillway-nowhere/checkpoints",
            ],
        },
        {
            "name": "data file missing",
            "overrides": [
                *BASE,
                "data=memmap",
                f"data.path={root / 'no-such-tokens.bin'}",
                "data.seq_len=32",
                "data.vocab_size=256",
                f"run_dir={root / 'data'}",
            ],
        },
    ]
    env = {
        **os.environ,
        # Nothing listens there: every S3 call is refused at once, and botocore tries once.
        "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}",
        "AWS_ACCESS_KEY_ID": "spillway-test",
        "AWS_SECRET_ACCESS_KEY": "spillway-test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", _CASES, json.dumps(cases)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"name"')]
    by_name = {line["name"]: line["result"] for line in lines}
    assert set(by_name) == {c["name"] for c in cases}, done.stdout[-2000:]
    return by_name


def _failed(result: dict) -> dict:
    assert result["step"] is None and not result["drained"] and not result["fenced"]
    assert result["failed"] is not None, result
    failed = result["failed"]
    assert "\n" not in failed["message"] and failed["traceback"].count("\n") < 30
    return failed


def test_storage_lost_after_a_commit_is_infrastructure(results):
    failed = _failed(results["storage lost mid-run"])
    assert failed["code"] == exit_codes.INFRASTRUCTURE, failed
    assert failed["kind"] == "infrastructure" and not failed["peer"]
    assert "Error" in failed["message"] and "checkpoints" in failed["traceback"]
    assert exit_code_for([results["storage lost mid-run"]]) == exit_codes.INFRASTRUCTURE


def test_an_unreachable_object_store_is_infrastructure(results):
    failed = _failed(results["object store unreachable"])
    assert failed["code"] == exit_codes.INFRASTRUCTURE, failed
    assert failed["message"].startswith("EndpointConnectionError: Could not connect")
    assert exit_code_for([results["object store unreachable"]]) == exit_codes.INFRASTRUCTURE


def test_a_data_path_the_user_got_wrong_is_a_user_error(results):
    failed = _failed(results["data file missing"])
    assert failed["code"] == exit_codes.USER_ERROR and failed["kind"] == "user", failed
    assert failed["message"].startswith("FileNotFoundError: ")
    assert "no-such-tokens.bin" in failed["message"] and "recipes.gpt.data" in failed["message"]
    # Beside a rank that saw the collective break under it, the user's error still decides.
    peer = {
        "step": None, "drained": False, "fenced": False,
        "failed": {**failed, "code": exit_codes.INFRASTRUCTURE, "peer": True},
    }  # fmt: skip
    assert exit_code_for([peer, results["data file missing"]]) == exit_codes.USER_ERROR


def test_the_storage_was_lost_after_a_commit_not_before(results, root):
    assert results["storage lost mid-run"]["failed"] is not None
    assert (root / "lost" / "checkpoints").is_file()
    assert list((root / "lost" / "checkpoints.gone").glob("step-*/MANIFEST.json"))
