"""Composition of conf/ against the typed schema, and the checks validate() adds."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from orchestrator.config import ConfigError, compose_run, validate
from orchestrator.config.compose import CONF_DIR, CONFIG_DIR_ENV, ensure_state_dir
from orchestrator.config.schema import GROUPS


def test_defaults_compose_and_validate(spillway_home: Path):
    cfg = compose_run()
    validate(cfg, world_size=2, device_type="cpu")
    assert cfg.model.name == "tiny" and cfg.data.kind == "repo_text"
    assert cfg.run_dir == f"{spillway_home}/runs/gpt-tiny-repo_text"
    assert cfg.checkpoint.storage == f"{cfg.run_dir}/checkpoints"


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_every_option_of_every_group_matches_the_schema(group):
    fields = {f.name for f in dataclasses.fields(GROUPS[group])}
    options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    assert options, group
    for option in options:
        cfg = compose_run([f"{group}={option}"])
        assert set(cfg[group]) == fields


def test_overrides_reach_the_typed_fields():
    cfg = compose_run(["trainer.max_steps=7", "optim.lr=0.5", "run_dir=/x/y"])
    assert cfg.trainer.max_steps == 7 and isinstance(cfg.trainer.max_steps, int)
    assert cfg.optim.lr == 0.5
    assert cfg.checkpoint.storage == "/x/y/checkpoints"


def test_trainer_gpu_extends_default():
    cfg = compose_run(["trainer=gpu"])
    assert cfg.trainer.param_dtype == "bf16" and cfg.trainer.compile
    assert cfg.trainer.max_steps == 300  # inherited from trainer/default.yaml


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        (["trainer.foo=1"], "trainer.foo", "no such key (allowed: max_steps, stop_at_step"),
        (["+trainer.foo=1"], "trainer.foo", "no such key"),
        (["foo=1"], "foo", "no such key (allowed: recipe, model"),
        (["model=huge"], "model", "no option 'huge' (allowed: 1b, 8b, small, tiny)"),
        (["trainer.compile=maybe"], "trainer.compile", "Value 'maybe'"),
        (["trainer.max_steps"], "overrides", "Error parsing override"),
    ],
)
def test_composition_errors_name_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as err:
        compose_run(overrides)
    assert err.value.key == key
    assert words in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "world", "key"),
    [
        (["trainer.max_steps=0"], 1, "trainer.max_steps"),
        (["trainer.stop_at_step=301"], 1, "trainer.stop_at_step"),
        (["trainer.global_batch_size=10"], 4, "trainer.global_batch_size"),
        (["trainer.param_dtype=fp16"], 1, "trainer.param_dtype"),
        (["trainer.device=tpu"], 1, "trainer.device"),
        (["checkpoint.keep=1"], 1, "checkpoint.keep"),
        (["checkpoint.every_steps=0"], 1, "checkpoint.every_steps"),
        (["data.seq_len=512"], 1, "data.seq_len"),
        (["data.vocab_size=1000"], 1, "data.vocab_size"),
        (["model.n_kv_heads=3"], 1, "model.n_kv_heads"),
        (["model.dropout=1.5"], 1, "model.dropout"),
        (["optim.lr=0"], 1, "optim.lr"),
        (["logger.kind=tensorboard"], 1, "logger.kind"),
        (["data=synthetic", "data.dtype=int8"], 1, "data.dtype"),
        (["placement.recovery=pray"], 1, "placement.recovery"),
        (["placement.max_restarts=-1"], 1, "placement.max_restarts"),
        (["placement.drain_timeout_s=0"], 1, "placement.drain_timeout_s"),
        (["placement.user_error_exit_codes=[1,75]"], 1, "placement.user_error_exit_codes"),
        (["placement.user_error_exit_codes=[0]"], 1, "placement.user_error_exit_codes"),
        (["placement.copy_limit_mb_s=-2"], 1, "placement.copy_limit_mb_s"),
        (["placement.copy_limit_mb_s=inf"], 1, "placement.copy_limit_mb_s"),
        # nan compares false with every bound: each number must be finite first.
        (["optim.lr=nan"], 1, "optim.lr"),
        (["optim.grad_clip=inf"], 1, "optim.grad_clip"),
        (["model.dropout=nan"], 1, "model.dropout"),
        (["optim.beta2=1.0"], 1, "optim.beta2"),
        (["optim.eps=0"], 1, "optim.eps"),
        (["placement.spill_after_s=-1"], 1, "placement.spill_after_s"),
        (["placement.min_lease_left_s=-5"], 1, "placement.min_lease_left_s"),
        (["placement.budget=-0.5"], 1, "placement.budget"),
        (["placement.budget=nan"], 1, "placement.budget"),
        (["resources.min_devices=0"], 1, "resources.min_devices"),
        (["resources.min_devices=3"], 1, "resources.min_devices"),
    ],
)
def test_validation_names_the_key_and_what_is_allowed(overrides, world, key):
    cfg = compose_run(overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=world, device_type="cpu")
    assert err.value.key == key


def test_the_fleet_is_not_validate_s_business():
    # fleet.* is validate_fleet's (tests/unit/test_fleet_config.py): one check, CLI and
    # controller alike; a rank's validate() does not look at it.
    validate(compose_run(["fleet.lost_after_s=0"]), world_size=1, device_type="cpu")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("name: mine\nclusters: [\n", "line 3, column 1: not valid YAML"),
        ("name: mine\nclusters:\n  home:\n    devices: many\n", "could not be converted"),
        ("name: mine\nclusters:\n  home:\n    gpus: 4\n", "no such key (allowed: kind, local"),
    ],
)
def test_a_broken_group_file_is_one_line_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, words: str
):
    (tmp_path / "fleet").mkdir()
    (tmp_path / "fleet" / "mine.yaml").write_text(text)
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path))
    with pytest.raises(ConfigError) as err:
        compose_run(["fleet=mine"])
    assert err.value.key in ("fleet", "fleet.clusters.home.devices", "fleet.clusters.home.gpus")
    assert words in str(err.value) and "\n" not in str(err.value)


def test_the_state_dir_is_made_for_its_owner_only(tmp_path: Path):
    made = ensure_state_dir(str(tmp_path / "a" / "home"))
    assert made.is_dir() and stat.S_IMODE(made.stat().st_mode) == 0o700
    (tmp_path / "theirs").mkdir(mode=0o755)
    os.chmod(tmp_path / "theirs", 0o755)
    ensure_state_dir(str(tmp_path / "theirs"))
    assert stat.S_IMODE((tmp_path / "theirs").stat().st_mode) == 0o755, "left as it was"


def test_global_batch_divides_any_world_size_it_is_a_multiple_of():
    cfg = compose_run(["trainer.global_batch_size=24"])
    for world in (1, 2, 3, 4, 6, 8, 12, 24):
        validate(cfg, world_size=world, device_type="cpu")
    with pytest.raises(ConfigError, match="does not divide over 5 ranks"):
        validate(cfg, world_size=5, device_type="cpu")


def test_gpu_models_are_refused_on_cpu_only():
    cfg = compose_run(["model=8b", "data=synthetic"])
    with pytest.raises(ConfigError, match="needs a GPU"):
        validate(cfg, world_size=1, device_type="cpu")
    validate(cfg, world_size=8, device_type="cuda")


def test_composed_config_is_plain_data():
    cfg = compose_run()
    assert OmegaConf.to_container(cfg, throw_on_missing=True)["trainer"]["max_steps"] == 300


def test_the_broken_environment_code_cannot_be_a_user_error():
    cfg = compose_run(["placement.user_error_exit_codes=[1,78]"])
    with pytest.raises(ConfigError, match=r"78 \(cluster environment\)"):
        validate(cfg, world_size=1, device_type="cpu")


def test_a_reserved_exit_code_is_refused_with_what_it_means():
    cfg = compose_run(["placement.user_error_exit_codes=[75]"])
    with pytest.raises(
        ConfigError, match=r"75 is not allowed: codes are 1..255 except .*75 \(drained\)"
    ):
        validate(cfg, world_size=1, device_type="cpu")
