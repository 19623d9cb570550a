"""What an attempt's driver is handed and how it ends: the run config it trains, the code its
job carries, the cluster's environment it checks first, the exit code the controller reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from ray.exceptions import (
    ActorDiedError,
    GetTimeoutError,
    NodeDiedError,
    OutOfMemoryError,
    RayTaskError,
    RuntimeEnvSetupError,
    WorkerCrashedError,
)

from orchestrator import exit_codes
from orchestrator.backends.ray_jobs import SHIPPED_EXCLUDES, package_dir, runtime_env
from orchestrator.config import ConfigError, compose_run, validate
from orchestrator.rundir import RunDir
from orchestrator.runtime import driver
from orchestrator.runtime.driver import exit_code_for
from orchestrator.runtime.failures import failure_report
from orchestrator.runtime.spec import SPEC_ENV, AttemptSpec, attempt_run_config

CHECKOUT = Path(__file__).resolve().parents[2]


def _raised(cause: Exception) -> RayTaskError:
    return RayTaskError("RankActor.run", "Traceback ...", cause)


def test_a_dead_rank_process_is_a_fault_whatever_the_others_raised():
    peer_broke = _raised(RuntimeError("Connection closed by peer"))
    assert exit_code_for([peer_broke, ActorDiedError()]) == exit_codes.RANK_LOST
    assert exit_code_for([ActorDiedError()]) == exit_codes.RANK_LOST
    assert exit_code_for([GetTimeoutError("rank actors did not start")]) == exit_codes.RANK_LOST


def test_a_bad_config_exits_2_and_any_other_exception_1():
    assert exit_code_for([_raised(ConfigError("trainer.max_steps", "must be >= 1"))]) == 2
    assert exit_code_for([_raised(ValueError("a bug in the recipe"))]) == 1


def test_a_runtime_env_a_node_cannot_set_up_is_the_clusters_fault():
    broken = RuntimeEnvSetupError("pip failed on node 2")
    assert exit_code_for([broken, ActorDiedError()]) == exit_codes.BROKEN_ENVIRONMENT


def test_the_codes_only_spillway_exits_with_are_reserved():
    reserved = {
        exit_codes.NO_CAPACITY, exit_codes.RANK_LOST, exit_codes.INFRASTRUCTURE,
        exit_codes.DRAINED, exit_codes.FENCED, exit_codes.BROKEN_ENVIRONMENT,
    }  # fmt: skip
    assert set(exit_codes.RESERVED) == reserved and len(reserved) == 6
    # The user's own codes are not among them: they may be listed as user errors.
    assert not {exit_codes.USER_ERROR, exit_codes.BAD_CONFIG} & set(exit_codes.RESERVED)


# ---- what ranks return, heard in order -------------------------------------------------------


def _rank_raised(fn) -> dict:
    """What train_rank returns for a recipe that raised what `fn` raises."""
    try:
        fn()
    except Exception as exc:
        return {"step": None, "drained": False, "fenced": False, "failed": failure_report(exc)}
    raise AssertionError("nothing raised")


def _users_bug() -> None:
    {"dim": 64}["n_heads"]


def _storage_failed(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    RunDir(str(blocker / "run")).write_run_config({})


def _collective_broke() -> None:
    # gloo's words when the peer's process is gone (tests/unit/test_failures.py makes a real one).
    raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                       "[127.0.0.1]:24994: Connection reset by peer")  # fmt: skip


FINISHED = {"step": 12, "drained": False, "fenced": False, "failed": None}
DRAINED = {"step": 6, "drained": True, "fenced": False, "failed": None}
FENCED = {"step": 6, "drained": False, "fenced": True, "failed": None}


def test_the_ranks_that_broke_in_a_collective_give_way_to_the_rank_that_raised_first():
    user = _rank_raised(_users_bug)
    peer = _rank_raised(_collective_broke)
    assert user["failed"]["code"] == exit_codes.USER_ERROR and not user["failed"]["peer"]
    assert peer["failed"]["code"] == exit_codes.INFRASTRUCTURE and peer["failed"]["peer"]
    # Whichever the driver heard first: rank 3's KeyError left ranks 0-2 in the all-reduce.
    assert exit_code_for([user, peer, peer, peer]) == exit_codes.USER_ERROR
    assert exit_code_for([peer, peer, user]) == exit_codes.USER_ERROR
    # With nobody else to blame, a broken collective is the infrastructure's.
    assert exit_code_for([peer, peer]) == exit_codes.INFRASTRUCTURE


def test_the_first_failure_of_a_ranks_own_decides(tmp_path: Path):
    storage = _rank_raised(lambda: _storage_failed(tmp_path))
    user = _rank_raised(_users_bug)
    peer = _rank_raised(_collective_broke)
    assert storage["failed"]["code"] == exit_codes.INFRASTRUCTURE and not storage["failed"]["peer"]
    assert exit_code_for([peer, storage, user]) == exit_codes.INFRASTRUCTURE
    assert exit_code_for([user, storage]) == exit_codes.USER_ERROR
    config = _rank_raised(lambda: validate(compose_run(["placement.max_restarts=-1"]), 1))
    assert config["failed"]["kind"] == "config"
    assert exit_code_for([peer, config, FINISHED]) == exit_codes.BAD_CONFIG


def test_a_fenced_rank_decides_before_anything_else():
    user = _rank_raised(_users_bug)
    assert exit_code_for([user, FENCED, ActorDiedError()]) == exit_codes.FENCED
    assert exit_code_for([FENCED, FINISHED]) == exit_codes.FENCED


@pytest.mark.parametrize(
    "lost",
    [
        ActorDiedError(),
        NodeDiedError("node gone"),
        WorkerCrashedError(),
        OutOfMemoryError("oom-killed"),
    ],
)
def test_a_rank_whose_process_or_node_died_is_rank_lost(lost):
    assert exit_code_for([_rank_raised(_collective_broke), lost]) == exit_codes.RANK_LOST
    assert exit_code_for([_rank_raised(_users_bug), lost]) == exit_codes.RANK_LOST


def test_ranks_that_finish_or_drain_together():
    assert exit_code_for([FINISHED, FINISHED]) == 0
    assert exit_code_for([DRAINED, DRAINED]) == exit_codes.DRAINED
    assert exit_code_for([DRAINED, _rank_raised(_users_bug)]) == exit_codes.USER_ERROR


def test_an_error_of_the_drivers_own_call_is_infrastructure(tmp_path: Path):
    with pytest.raises(OSError) as raised:
        _storage_failed(tmp_path)
    assert exit_code_for([FINISHED, raised.value]) == exit_codes.INFRASTRUCTURE
    # A RayTaskError still says what the rank raised before or around train_rank.
    assert exit_code_for([_raised(ConnectionRefusedError(111, "refused"))]) == 74


def test_each_failed_rank_says_one_line_and_its_traceback_goes_to_the_log(capsys):
    heard = [(0, _rank_raised(_collective_broke)), (1, FINISHED), (3, _rank_raised(_users_bug))]
    driver._report(heard)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("spillway: rank 0 failed (infrastructure): RuntimeError: [")
    assert lines[1].startswith("spillway: rank 3 failed (user): KeyError: 'n_heads' (at ")
    assert "  rank 3 | KeyError: 'n_heads'" in out.splitlines()
    assert not [
        line for line in out.splitlines() if not line.startswith(("  rank 0 | ", "  rank 3 | "))
    ]


# ---- the run config of one attempt --------------------------------------------------------


def test_an_attempt_trains_the_stored_config_with_its_own_keys_pinned():
    from omegaconf import OmegaConf

    stored = OmegaConf.to_container(compose_run(["trainer.max_steps=7", "resources.devices=4"]))
    before = json.dumps(stored, sort_keys=True)
    cfg = attempt_run_config(stored, 2, "s3://b/jobs/j1/attempt-3", "s3://b/jobs/j1/checkpoints")
    assert cfg["resources"]["devices"] == 2
    assert cfg["run_dir"] == "s3://b/jobs/j1/attempt-3"
    assert cfg["checkpoint"]["storage"] == "s3://b/jobs/j1/checkpoints"
    assert cfg["trainer"]["max_steps"] == 7 and cfg["model"] == stored["model"]
    # The fleet (every cluster, the controller's address) stays home.
    assert "fleet" not in cfg
    assert json.dumps(stored, sort_keys=True) == before  # the stored config is left as it was


def test_the_spec_carries_no_overrides_and_round_trips():
    spec = AttemptSpec("j1", 3, 2, "GPU", "s3://b/jobs/j1/attempt-3", epoch=4, reserve_timeout_s=5)
    assert set(json.loads(spec.to_json())) == {
        "job_id", "attempt", "world_size", "device_resource", "run_dir", "epoch",
        "reserve_timeout_s",
    }  # fmt: skip
    os.environ[SPEC_ENV] = spec.to_json()
    try:
        assert AttemptSpec.from_env() == spec
    finally:
        del os.environ[SPEC_ENV]


# ---- what the job carries ------------------------------------------------------------------


def test_the_job_carries_spillways_code_and_only_the_attempt_spec():
    spec = AttemptSpec("j1", 1, 2, "spillway_device", "/runs/j1/attempt-1")
    env = runtime_env(spec)
    assert env["py_modules"] == [str(CHECKOUT / "orchestrator"), str(CHECKOUT / "recipes")]
    assert env["env_vars"] == {SPEC_ENV: spec.to_json()}
    assert set(env) == {"py_modules", "excludes", "env_vars"}


def test_the_shipped_package_has_the_code_and_configs_and_no_byte_code(tmp_path: Path):
    from ray._private.runtime_env.packaging import create_package

    (CHECKOUT / "orchestrator" / "__pycache__").mkdir(exist_ok=True)  # as any import leaves
    target = tmp_path / "orchestrator.zip"
    create_package(
        package_dir("orchestrator"),
        target,
        include_gitignore=True,
        include_parent_dir=True,
        excludes=list(SHIPPED_EXCLUDES),
    )
    names = zipfile.ZipFile(target).namelist()
    assert "orchestrator/runtime/driver.py" in names
    assert "orchestrator/conf/train.yaml" in names and "orchestrator/conf/fleet/local.yaml" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


# ---- the driver's first checks, before Ray -------------------------------------------------

_DRIVER = """
import sys
from orchestrator.runtime import driver, requirements
requirements.RUNTIME = (*requirements.RUNTIME, *sys.argv[1:])
try:
    driver.main()
finally:
    print("imported:", *sorted(m for m in ("ray", "torch") if m in sys.modules), flush=True)
"""


def _driver(tmp_path: Path, run_dir: str, *extra_requirements: str) -> subprocess.CompletedProcess:
    spec = AttemptSpec("j1", 1, 2, "spillway_device", run_dir)
    return subprocess.run(
        [sys.executable, "-c", _DRIVER, *extra_requirements],
        env={**os.environ, SPEC_ENV: spec.to_json()},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_cluster_without_what_spillway_needs_exits_with_its_own_code(tmp_path: Path):
    run_dir = tmp_path / "attempt-1"
    RunDir(str(run_dir)).write_run_config({"logger": {"kind": "none"}})
    out = _driver(tmp_path, str(run_dir), "torch>=99", "no-such-package-spillway==1.0")
    assert out.returncode == exit_codes.BROKEN_ENVIRONMENT, out.stderr
    errors = out.stderr.strip().splitlines()
    assert len(errors) == 1, out.stderr
    assert errors[0].startswith("spillway: this cluster cannot run Spillway: torch ")
    assert "is installed, Spillway needs torch>=99" in errors[0]
    assert "no-such-package-spillway is not installed" in errors[0]
    # It names the Spillway it runs, and checked before importing what may be missing.
    assert f"Spillway imported from {CHECKOUT / 'orchestrator'}\n" in out.stdout
    assert "imported:\n" in out.stdout


def test_a_run_that_logs_to_wandb_needs_wandb_too(tmp_path: Path):
    run_dir = tmp_path / "attempt-1"
    RunDir(str(run_dir)).write_run_config({"logger": {"kind": "wandb"}})
    from orchestrator.runtime import requirements

    requirements_before = requirements.WANDB
    assert requirements_before.startswith("wandb")
    script = _DRIVER.replace(
        "requirements.RUNTIME = (*requirements.RUNTIME, *sys.argv[1:])",
        "requirements.WANDB = 'wandb>=999'",
    )
    spec = AttemptSpec("j1", 1, 2, "spillway_device", str(run_dir))
    out = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, SPEC_ENV: spec.to_json()},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == exit_codes.BROKEN_ENVIRONMENT, out.stderr
    assert "Spillway needs wandb>=999" in out.stderr


def test_a_failure_of_the_driver_itself_is_infrastructure(tmp_path: Path):
    run_dir = tmp_path / "attempt-1"
    RunDir(str(run_dir)).write_run_config({"logger": {"kind": "none"}})
    (tmp_path / "a-file").write_text("x")
    # Past its checks the driver's own storage call fails (instead of ray.init, which would
    # find whichever Ray runs on this machine).
    script = _DRIVER.replace(
        "requirements.RUNTIME = (*requirements.RUNTIME, *sys.argv[1:])",
        "from orchestrator.rundir import RunDir\n"
        "driver._attempt = lambda *_: RunDir('a-file/run').request_drain('x') or 0",
    )
    spec = AttemptSpec("j1", 1, 2, "spillway_device", str(run_dir))
    out = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, SPEC_ENV: spec.to_json()},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == exit_codes.INFRASTRUCTURE, out.stderr
    errors = out.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("spillway: the driver failed: NotADirectory")
    assert "Traceback (most recent call last)" in out.stdout


def test_a_run_config_the_cluster_cannot_read_is_the_clusters_fault(tmp_path: Path):
    out = _driver(tmp_path, str(tmp_path / "never-written"))
    assert out.returncode == exit_codes.BROKEN_ENVIRONMENT, out.stderr
    assert out.stderr.startswith("spillway: cannot read the run config in ")
    assert len(out.stderr.strip().splitlines()) == 1
