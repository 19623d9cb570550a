"""What a cluster's Python must have: found, missing, the wrong version; equal to pyproject."""

from __future__ import annotations

from pathlib import Path

import tomllib
from packaging.requirements import Requirement

from orchestrator.runtime.requirements import (
    HOME_ONLY,
    RUNTIME,
    S3FS,
    WANDB,
    check,
    needed,
    problems,
)

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
WANTED = ["torch>=2.11,<2.14", "ray[default]==2.60.*", "omegaconf>=2.3,<2.4", "fsspec>=2024.6"]
GOOD = {"torch": "2.13.0+cpu", "ray": "2.60.0", "omegaconf": "2.3.0", "fsspec": "2025.3.0"}


def test_everything_found_is_no_problem():
    assert problems(GOOD, WANTED) == []


def test_a_missing_package_is_named_with_what_is_needed():
    assert problems({**GOOD, "ray": None}, WANTED) == [
        "ray is not installed (Spillway needs ray==2.60.*)"
    ]
    # Absent from the map is the same as not installed.
    without = {k: v for k, v in GOOD.items() if k != "fsspec"}
    assert problems(without, WANTED) == ["fsspec is not installed (Spillway needs fsspec>=2024.6)"]


def test_a_wrong_version_names_what_was_found_against_what_is_needed():
    found = problems({**GOOD, "torch": "2.10.1", "ray": "2.59.0"}, WANTED)
    assert found == [
        "torch 2.10.1 is installed, Spillway needs torch<2.14,>=2.11",
        "ray 2.59.0 is installed, Spillway needs ray==2.60.*",
    ]
    assert problems({**GOOD, "omegaconf": "not-a-version"}, WANTED) == [
        "omegaconf not-a-version is installed, Spillway needs omegaconf<2.4,>=2.3"
    ]


def test_a_release_candidate_of_an_allowed_version_will_do():
    assert problems({**GOOD, "torch": "2.12.0rc2"}, WANTED) == []


def test_names_match_as_pip_spells_them():
    assert problems({"Hydra_Core": "1.3.8"}, ["hydra-core==1.3.8"]) == []


def test_wandb_is_needed_only_by_a_run_that_logs_to_it():
    assert needed({"logger": {"kind": "none"}}) == list(RUNTIME)
    assert needed({"logger": {"kind": "wandb"}}) == [*RUNTIME, WANDB]
    assert needed() == list(RUNTIME)


def test_the_requirements_are_pyprojects_dependencies():
    declared = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    by_name = {Requirement(d).name: Requirement(d) for d in declared}
    ours = {Requirement(r).name: Requirement(r) for r in [*RUNTIME, WANDB, S3FS, *HOME_ONLY]}
    assert set(ours) == set(by_name)
    for name, req in ours.items():
        assert req.specifier == by_name[name].specifier, name
    assert {"torch", "ray", "omegaconf", "fsspec"} <= {Requirement(r).name for r in RUNTIME}


def test_this_python_has_what_spillway_needs_and_a_lack_is_one_line():
    assert check(RUNTIME) is None
    line = check([*RUNTIME, "torch>=99", "no-such-package-spillway==1.0"])
    assert "\n" not in line
    assert line.startswith("torch ") and "is installed, Spillway needs torch>=99" in line
    assert "no-such-package-spillway is not installed" in line


def test_s3fs_is_needed_only_for_a_run_on_s3():
    assert S3FS not in needed({"run_dir": "/data/run", "checkpoint": {"storage": "/data/c"}})
    assert S3FS in needed({"run_dir": "s3://b/run", "checkpoint": {"storage": "/data/c"}})
    assert S3FS in needed({"run_dir": "/data/run", "checkpoint": {"storage": "s3://b/c"}})
