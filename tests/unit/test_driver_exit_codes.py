"""What an attempt's driver is handed and how it ends: the run config it trains, the code its
job carries, the cluster's environment it checks first, the exit code the controller reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from ray.exceptions import ActorDiedError, GetTimeoutError, RayTaskError, RuntimeEnvSetupError

from orchestrator import exit_codes
from orchestrator.backends.ray_jobs import SHIPPED_EXCLUDES, package_dir, runtime_env
from orchestrator.config import ConfigError, compose_run
from orchestrator.rundir import RunDir
from orchestrator.runtime.driver import exit_code_for
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


def test_the_broken_environment_code_is_reserved():
    assert exit_codes.BROKEN_ENVIRONMENT in exit_codes.RESERVED
    assert len(set(exit_codes.RESERVED)) == len(exit_codes.RESERVED) == 4


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
    spec = AttemptSpec("j1", 3, 2, "GPU", "s3://b/jobs/j1/attempt-3", reserve_timeout_s=5)
    assert set(json.loads(spec.to_json())) == {
        "job_id", "attempt", "world_size", "device_resource", "run_dir", "reserve_timeout_s"
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


def test_a_run_config_the_cluster_cannot_read_is_the_clusters_fault(tmp_path: Path):
    out = _driver(tmp_path, str(tmp_path / "never-written"))
    assert out.returncode == exit_codes.BROKEN_ENVIRONMENT, out.stderr
    assert out.stderr.startswith("spillway: cannot read the run config in ")
    assert len(out.stderr.strip().splitlines()) == 1
