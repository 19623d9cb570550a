"""A user's own config groups beside Spillway's: $SPILLWAY_CONFIG_DIR or `spillway --config-dir`."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config import ConfigError, compose_run, validate
from orchestrator.config.compose import CONFIG_DIR_ENV
from tests.user_configs import HUGE_MODEL

MINE = """\
name: mine
clusters:
  gpus:
    kind: owned
    address: 10.0.0.5:6379
    dashboard_url: http://10.0.0.5:8265
    token_path: ~/.spillway/secrets/gpus
    device_type: h100
    devices: 8
    device_resource: GPU
    storage_root: s3://my-team/checkpoints
"""


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    mine = tmp_path / "my conf"  # a space, as in a user's home
    (mine / "fleet").mkdir(parents=True)
    (mine / "model").mkdir()
    (mine / "fleet" / "mine.yaml").write_text(MINE)
    (mine / "model" / "huge.yaml").write_text(HUGE_MODEL)
    return mine


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No config dir set, whatever the CLI sets is undone, and a SPILLWAY_HOME to watch."""
    monkeypatch.delenv(CONFIG_DIR_ENV, raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("SPILLWAY_HOME", str(home))
    return home


def test_the_env_var_adds_the_users_groups(user_dir: Path, clean_env, monkeypatch):
    monkeypatch.setenv(CONFIG_DIR_ENV, str(user_dir))
    cfg = compose_run(["fleet=mine", "model=huge", "data=synthetic"])
    assert cfg.fleet.name == "mine" and cfg.fleet.clusters.gpus.devices == 8
    assert cfg.fleet.clusters.gpus.device_resource == "GPU"
    assert cfg.model.name == "huge" and cfg.model.dim == 128
    validate(cfg, world_size=2, device_type="cpu")
    # Spillway's own groups are all still there.
    assert compose_run(["model=small"]).model.name == "small"
    assert compose_run().fleet.name == "local"


def test_an_unknown_option_lists_the_users_options_too(user_dir: Path, clean_env, monkeypatch):
    monkeypatch.setenv(CONFIG_DIR_ENV, str(user_dir))
    with pytest.raises(ConfigError) as err:
        compose_run(["model=giant"])
    assert err.value.key == "model"
    assert str(err.value) == "model: no option 'giant' (allowed: 1b, 8b, huge, small, tiny)"
    with pytest.raises(ConfigError, match=r"allowed: example_partner, local, mine\)"):
        compose_run(["fleet=theirs"])


def test_without_the_env_var_the_users_groups_are_unknown(user_dir: Path, clean_env):
    with pytest.raises(ConfigError, match=r"no option 'huge' \(allowed: 1b, 8b, small, tiny\)"):
        compose_run(["model=huge"])


def test_a_config_dir_that_does_not_exist_is_named(tmp_path: Path, clean_env, monkeypatch):
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError) as err:
        compose_run()
    assert err.value.key == CONFIG_DIR_ENV
    assert f"{tmp_path / 'nowhere'} is not a directory" in str(err.value)


def test_a_user_file_named_like_spillways_own_is_refused(user_dir: Path, clean_env, monkeypatch):
    (user_dir / "model" / "tiny.yaml").write_text(HUGE_MODEL.replace("huge", "tiny"))
    monkeypatch.setenv(CONFIG_DIR_ENV, str(user_dir))
    with pytest.raises(ConfigError) as err:
        compose_run()
    assert err.value.key == CONFIG_DIR_ENV
    assert "has the name of Spillway's own model=tiny; give it another name" in str(err.value)


def test_the_flag_sets_what_compose_reads(user_dir: Path, clean_env: Path, capsys):
    # model=huge composes (else the error would name `model`); the bad max_steps stops the
    # run before anything starts.
    code = main(["--config-dir", str(user_dir), "run", "model=huge", "trainer.max_steps=0"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("spillway: bad config: trainer.max_steps:") and err.count("\n") == 1
    code = main(["--config-dir", str(user_dir), "run", "model=giant"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        "spillway: bad config: model: no option 'giant' (allowed: 1b, 8b, huge, small, tiny)\n"
    )
    assert not clean_env.exists()  # nothing written


def test_a_flag_naming_no_directory_is_one_line_and_exit_2(tmp_path: Path, clean_env, capsys):
    code = main(["--config-dir", str(tmp_path / "nowhere"), "run"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"spillway: bad config: --config-dir: {tmp_path / 'nowhere'} is not")
    assert err.count("\n") == 1
    assert not clean_env.exists()
