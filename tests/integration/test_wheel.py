"""A wheel of the project, installed without the checkout, composes and validates run configs.

The wheel is built from a copy of the sources (the checkout gets no build/ of its own) and
installed into a bare directory; a fresh Python whose only way to Spillway is that directory
(PYTHONPATH), started outside the checkout, composes configs from the packaged conf/ and from
a user's own config dir.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests.user_configs import HUGE_MODEL

CHECKOUT = Path(__file__).resolve().parents[2]
PIP_TIMEOUT_S = 120

COMPOSE = textwrap.dedent(
    """
    import json, os, sys
    import orchestrator, recipes
    from orchestrator.config import compose_run, validate
    from orchestrator.config.compose import CONF_DIR

    found = {"orchestrator": orchestrator.__file__, "recipes": recipes.__file__,
             "conf": str(CONF_DIR)}
    cfg = compose_run()
    validate(cfg, world_size=2, device_type="cpu")
    found["default"] = [cfg.model.name, cfg.data.name, cfg.fleet.name]
    cfg = compose_run(["model=small", "trainer=gpu", "data=synthetic", "fleet=example_partner"])
    validate(cfg, world_size=8, device_type="cuda")
    found["groups"] = [cfg.model.name, cfg.trainer.param_dtype, cfg.fleet.name]
    os.environ["SPILLWAY_CONFIG_DIR"] = sys.argv[1]
    cfg = compose_run(["model=huge", "data=synthetic"])
    validate(cfg, world_size=2, device_type="cpu")
    found["user"] = [cfg.model.name, cfg.model.dim]
    print(json.dumps(found))
    """
)


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, **kwargs)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return out


@pytest.fixture(scope="module")
def installed(spillway_home: Path) -> Path:
    """The wheel, installed with no dependencies into a directory of its own."""
    work = spillway_home / "wheel-test"
    shutil.rmtree(work, ignore_errors=True)
    src = work / "src"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(CHECKOUT / name, src / name)
    leftovers = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for package in ("orchestrator", "recipes"):
        shutil.copytree(CHECKOUT / package, src / package, ignore=leftovers)
    wheels = work / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)])
    (wheel,) = wheels.glob("spillway-*.whl")
    target = work / "site"
    _run([*pip, "install", "--no-deps", "--no-compile", "--target", str(target), str(wheel)])
    return target


def test_the_wheel_holds_every_config_group(installed: Path, spillway_home: Path):
    (wheel,) = (spillway_home / "wheel-test" / "wheels").glob("spillway-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packaged = {
        f"orchestrator/{p.relative_to(CHECKOUT / 'orchestrator')}"
        for p in (CHECKOUT / "orchestrator" / "conf").rglob("*.yaml")
    }
    assert "orchestrator/conf/train.yaml" in packaged and len(packaged) > 10
    assert packaged <= names
    assert "recipes/gpt/train.py" in names
    assert not [n for n in names if n.startswith("tests/")]


def test_an_installed_wheel_composes_without_the_checkout(installed: Path, tmp_path: Path):
    user_dir = tmp_path / "my-configs"
    (user_dir / "model").mkdir(parents=True)
    (user_dir / "model" / "huge.yaml").write_text(HUGE_MODEL)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPILLWAY_CONFIG_DIR")}
    out = _run(
        [sys.executable, "-c", COMPOSE, str(user_dir)],
        cwd=elsewhere,
        env={**env, "PYTHONPATH": str(installed)},
    )
    found = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("orchestrator", "recipes", "conf"):
        assert Path(found[key]).is_relative_to(installed), (key, found[key])
        assert not Path(found[key]).is_relative_to(CHECKOUT), (key, found[key])
    assert found["default"] == ["tiny", "repo_text", "local"]
    assert found["groups"] == ["small", "bf16", "example_partner"]
    assert found["user"] == ["huge", 128]
