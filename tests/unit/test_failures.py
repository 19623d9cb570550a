"""Whose fault a rank's exception was, read from real exceptions raised by real code: the
user's own functions, Spillway's storage code, fsspec and s3fs, a socket, torch.distributed's
store, and a gloo collective whose peer died."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import fsspec
import pytest

from orchestrator import exit_codes
from orchestrator.checkpoint.storage import open_root, rename_dir
from orchestrator.config import ConfigError, compose_run, validate
from orchestrator.rundir import RunDir
from orchestrator.runtime.failures import (
    INFRASTRUCTURE,
    NEUTRAL,
    STORAGE,
    USER,
    describe,
    failure_code,
    failure_report,
    is_peer_failure,
    zone,
)
from recipes.gpt.data import MemmapTokens

CHECKOUT = Path(__file__).resolve().parents[2]
USER_ERROR, BAD_CONFIG, INFRA = (
    exit_codes.USER_ERROR,
    exit_codes.BAD_CONFIG,
    exit_codes.INFRASTRUCTURE,
)


def raised(fn: Callable[[], object]) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # SystemExit and KeyboardInterrupt too
        return exc
    raise AssertionError(f"{fn} raised nothing")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    """A regular file: a directory under it cannot be made, whoever asks (root included)."""
    path = tmp_path / "a-file"
    path.write_text("not a directory")
    return path


# ---- the user's own code -------------------------------------------------------------------


def test_an_exception_in_the_users_own_function_is_a_user_error():
    def lookup() -> int:
        return {"dim": 64}["n_heads"]

    exc = raised(lookup)
    assert isinstance(exc, KeyError)
    assert failure_code(exc) == USER_ERROR
    assert (
        describe(exc) == f"KeyError: 'n_heads' (at {__name__}:{lookup.__code__.co_firstlineno + 1})"
    )


def test_a_data_path_the_user_got_wrong_is_the_users_even_through_numpy(tmp_path: Path):
    exc = raised(lambda: MemmapTokens(str(tmp_path / "missing.bin"), "uint16", 8, 0))
    assert isinstance(exc, FileNotFoundError)
    assert failure_code(exc) == USER_ERROR
    assert "(at recipes.gpt.data:" in describe(exc)


def test_a_path_the_users_code_names_through_fsspec_is_the_users(a_file: Path):
    def write() -> None:
        with fsspec.open(str(a_file / "tokens.bin"), "wb") as f:
            f.write(b"1")

    exc = raised(write)
    assert isinstance(exc, OSError) and not isinstance(exc, ConnectionError)
    assert failure_code(exc) == USER_ERROR


def test_a_bad_file_descriptor_is_the_users_bug(a_file: Path):
    def read_closed() -> bytes:
        fd = os.open(a_file, os.O_RDONLY)
        os.close(fd)
        return os.read(fd, 1)

    exc = raised(read_closed)
    assert isinstance(exc, OSError) and exc.errno == 9
    assert failure_code(exc) == USER_ERROR


def test_a_recipe_that_stops_itself_is_the_users_and_exit_2_a_bad_config():
    assert failure_code(raised(lambda: sys.exit("checkpoint from another model shape"))) == 1
    assert failure_code(raised(lambda: sys.exit(2))) == BAD_CONFIG


def test_an_exception_that_lost_its_traceback_is_read_by_its_type():
    # As a RayTaskError's cause arrives: unpickled, no frames.
    assert failure_code(FileNotFoundError(2, "No such file", "/data/x.bin")) == INFRA
    assert failure_code(KeyError("n_heads")) == USER_ERROR


def test_an_interrupt_from_outside_is_not_the_users():
    def interrupted() -> None:
        raise KeyboardInterrupt

    assert failure_code(raised(interrupted)) == INFRA


# ---- the run config ------------------------------------------------------------------------


def test_a_bad_config_is_bad_config_even_when_wrapped():
    cfg = compose_run(["placement.max_restarts=-1"])
    exc = raised(lambda: validate(cfg, 1))
    assert isinstance(exc, ConfigError)
    assert failure_code(exc) == BAD_CONFIG

    def start() -> None:
        try:
            validate(cfg, 1)
        except ConfigError as err:
            raise RuntimeError("could not start the recipe") from err

    assert failure_code(raised(start)) == BAD_CONFIG


# ---- infrastructure ------------------------------------------------------------------------


def test_a_run_dir_write_that_fails_is_infrastructure(a_file: Path):
    exc = raised(lambda: RunDir(str(a_file / "run")).write_run_config({}))
    assert isinstance(exc, NotADirectoryError)
    assert failure_code(exc) == INFRA
    assert "(at orchestrator.rundir:" in describe(exc)


def test_a_checkpoint_directory_that_vanished_is_infrastructure(tmp_path: Path):
    fs, root = open_root(str(tmp_path))
    exc = raised(lambda: rename_dir(fs, f"{root}/step-000000004.tmp", f"{root}/step-000000004"))
    assert isinstance(exc, FileNotFoundError)  # raised by fsspec, for Spillway's own path
    assert failure_code(exc) == INFRA


def test_a_disk_that_fails_under_the_users_code_is_infrastructure():
    def write_cache() -> None:
        with open("/dev/full", "wb") as f:
            f.write(b"tokens")

    exc = raised(write_cache)
    assert isinstance(exc, OSError) and exc.errno == 28  # ENOSPC
    assert failure_code(exc) == INFRA


def test_a_refused_connection_is_infrastructure_even_when_the_user_wraps_it():
    port = _closed_port()

    def fetch() -> None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except OSError as err:
            raise ValueError("could not fetch the tokenizer") from err

    exc = raised(fetch)
    assert isinstance(exc, ValueError) and isinstance(exc.__cause__, ConnectionRefusedError)
    assert failure_code(exc) == INFRA
    assert failure_code(exc.__cause__) == INFRA


def test_an_unreachable_object_store_is_infrastructure():
    fs = fsspec.filesystem(
        "s3",
        endpoint_url=f"http://127.0.0.1:{_closed_port()}",
        key="spillway-test",
        secret="spillway-test",
        client_kwargs={"region_name": "us-east-1"},
        config_kwargs={"connect_timeout": 2, "read_timeout": 2, "retries": {"max_attempts": 1}},
        skip_instance_cache=True,
    )
    exc = raised(lambda: fs.ls("spillway-nowhere"))
    assert type(exc).__name__ == "EndpointConnectionError"  # botocore's, not an OSError
    assert failure_code(exc) == INFRA
    assert not is_peer_failure(exc)


def test_a_rendezvous_that_cannot_reach_its_store_is_a_collective_failure():
    import torch.distributed as dist

    port, wait = _closed_port(), timedelta(seconds=1)
    exc = raised(lambda: dist.TCPStore("127.0.0.1", port, is_master=False, timeout=wait))
    assert isinstance(exc, dist.DistError)
    assert failure_code(exc) == INFRA and is_peer_failure(exc)


# A pair of gloo ranks that join one all-reduce. Then rank 1 stays away from an all-reduce
# on a group with a 1 s timeout (rank 0's times out), joins one on another group, and dies
# (rank 0's next all-reduce there finds its peer gone). Rank 0 prints what it would report.
_GLOO_PAIR = """
import json, os, sys, time
from datetime import timedelta
import torch, torch.distributed as dist
from orchestrator.runtime.failures import failure_report

rank, port = int(sys.argv[1]), sys.argv[2]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2")
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
short = dist.new_group(timeout=timedelta(seconds=1))
steady = dist.new_group(timeout=timedelta(seconds=60))
dist.all_reduce(torch.ones(1))
if rank == 1:
    time.sleep(2)
    dist.all_reduce(torch.ones(1), group=steady)
    os._exit(9)
reports = {}
try:
    dist.all_reduce(torch.ones(1), group=short)
except Exception as exc:
    reports["hang"] = failure_report(exc)
dist.all_reduce(torch.ones(1), group=steady)
try:
    dist.all_reduce(torch.ones(1), group=steady)
except Exception as exc:
    reports["kill"] = failure_report(exc)
print(json.dumps(reports), flush=True)
os._exit(0)
"""


def test_a_collective_whose_peer_hung_or_died_is_infrastructure_and_says_peer():
    port = str(_closed_port())
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", _GLOO_PAIR, str(rank), port],
            cwd=CHECKOUT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    try:
        out, _ = ranks[0].communicate(timeout=90)
        ranks[1].wait(timeout=30)
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    reports = json.loads(out.strip().splitlines()[-1])
    assert set(reports) == {"hang", "kill"}, out
    for mode, report in reports.items():
        assert report["code"] == INFRA and report["kind"] == "infrastructure", (mode, report)
        assert report["peer"], (mode, report)
        assert "\n" not in report["message"]
        assert "all_reduce" in report["traceback"]
    assert "Timed out" in reports["hang"]["message"]
    assert "by peer" in reports["kill"]["message"] or "reset" in reports["kill"]["message"]


# ---- who owns a frame, and what is said --------------------------------------------------

SITE = "/venv/lib/python3.11/site-packages"


@pytest.mark.parametrize(
    ("module", "filename", "owner"),
    [
        ("orchestrator.checkpoint.distributed", "/co/orchestrator/checkpoint/x.py", INFRASTRUCTURE),
        ("orchestrator.rundir", "/tmp/ray/pkg/orchestrator/rundir.py", INFRASTRUCTURE),
        ("torch.distributed.distributed_c10d", f"{SITE}/torch/distributed/x.py", INFRASTRUCTURE),
        ("torch.distributed.checkpoint.filesystem", f"{SITE}/torch/x.py", INFRASTRUCTURE),
        # FSDP's and DTensor's own checks are about the model they were given.
        ("torch.distributed.fsdp._fully_shard._fsdp_init", f"{SITE}/torch/x.py", NEUTRAL),
        ("torch.distributed.tensor._api", f"{SITE}/torch/distributed/tensor/_api.py", NEUTRAL),
        ("fsspec.implementations.local", f"{SITE}/fsspec/implementations/local.py", STORAGE),
        ("s3fs.core", f"{SITE}/s3fs/core.py", STORAGE),
        ("botocore.endpoint", f"{SITE}/botocore/endpoint.py", STORAGE),
        ("recipes.gpt.data", f"{SITE}/recipes/gpt/data.py", USER),  # a wheel install
        ("my_models.gpt", "/home/me/configs/my_models/gpt.py", USER),
        ("__main__", "<string>", USER),
        ("orchestrator.config.validate", "/co/orchestrator/config/validate.py", NEUTRAL),
        ("json.decoder", "/usr/lib/python3.11/json/decoder.py", NEUTRAL),
        ("numpy._core.memmap", f"{SITE}/numpy/_core/memmap.py", NEUTRAL),
        ("torch.nn.functional", f"{SITE}/torch/nn/functional.py", NEUTRAL),
    ],
)
def test_whose_code_a_frame_runs(module, filename, owner):
    assert zone(module, filename) == owner


def test_the_description_is_one_line_and_bounded():
    def fail() -> None:
        raise ValueError("first line\nsecond line " + "x" * 1000)

    line = describe(raised(fail))
    assert "\n" not in line and line.startswith("ValueError: first line")
    assert len(line) < 400 and "second" not in line


def test_the_report_carries_the_tail_of_the_traceback():
    # Two functions in turn: a traceback folds a frame that repeats the one before it.
    def even(n: int) -> None:
        if n == 0:
            raise KeyError("innermost")
        odd(n - 1)

    def odd(n: int) -> None:
        even(n - 1)

    report = failure_report(raised(lambda: even(40)))
    assert report["code"] == USER_ERROR and report["kind"] == "user" and not report["peer"]
    lines = report["traceback"].splitlines()
    assert len(lines) == 30 and lines[-1] == "KeyError: 'innermost'"
    assert json.loads(json.dumps(report)) == report  # plain values: Ray sends it as is
