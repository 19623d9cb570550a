"""A run config that arrives over the API, merged onto the typed schema and pinned to this
controller's fleet before anything is recorded."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orchestrator.config.errors import ConfigError
from orchestrator.config.schema import RunConfig
from orchestrator.scheduling.admission import admit


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text)


def _refuse_missing(cfg: DictConfig, prefix: str = "") -> None:
    for key in cfg:
        full = f"{prefix}{key}"
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(full, "is required (the run config names no value)")
        value = cfg[key]
        if isinstance(value, DictConfig):
            _refuse_missing(value, f"{full}.")


def typed_run_config(data: Any, fleet: DictConfig, state_dir: str) -> DictConfig:
    """The run config as the controller stores it: the schema's types, this controller's fleet
    and state dir (whatever the client composed them from); ConfigError names the bad key."""
    if not isinstance(data, dict):
        raise ConfigError("run_config", "must be a JSON object (the resolved run config)")
    named = (data.get("fleet") or {}).get("name") if isinstance(data.get("fleet"), dict) else None
    if named is not None and named != fleet.name:
        raise ConfigError(
            "fleet", f"this controller runs fleet '{fleet.name}', the run config names '{named}'"
        )
    # Where the jobs run is the controller's business: its fleet, its state dir.
    data = {**data, "fleet": OmegaConf.to_container(fleet), "state_dir": state_dir}
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), data)
        OmegaConf.resolve(cfg)
        _refuse_missing(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "run_config"
        raise ConfigError(key, _first_line(str(exc))) from None
    admit(cfg)
    return cfg
