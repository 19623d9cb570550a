"""Compose conf/ with the typed schema and turn Hydra's exceptions into one ConfigError line."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orchestrator.config import schema
from orchestrator.config.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
PRIMARY = "train"


def spillway_home() -> str:
    """The one directory holding all of Spillway's state ($SPILLWAY_HOME, default ~/.spillway)."""
    return str(Path(os.environ.get("SPILLWAY_HOME", "~/.spillway")).expanduser().resolve())


def _register_once() -> None:
    if not OmegaConf.has_resolver("spillway_home"):
        OmegaConf.register_new_resolver("spillway_home", spillway_home)
    schema.register()


def compose_run(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The run config for these Hydra overrides, fully resolved; ConfigError if it is bad."""
    _register_once()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=PRIMARY, overrides=list(overrides))
        OmegaConf.resolve(cfg)
        _refuse_missing(cfg)
        _refuse_unknown_keys(cfg)
    except MissingConfigException as exc:
        raise _missing_option(exc) from None
    except OverrideParseException as exc:
        raise ConfigError("overrides", _first_line(str(exc))) from None
    except ConfigCompositionException as exc:
        raise _from_composition(exc, overrides) from None
    except OmegaConfBaseException as exc:
        raise _from_omegaconf(exc) from None
    return cfg


def _refuse_missing(cfg: DictConfig, prefix: str = "") -> None:
    for key in cfg:
        full = f"{prefix}{key}"
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(full, f"is required; set it on the command line, e.g. {full}=VALUE")
        value = cfg[key]
        if isinstance(value, DictConfig):
            _refuse_missing(value, f"{full}.")


def _refuse_unknown_keys(cfg: DictConfig) -> None:
    """A `+group.key=...` override slips past the schema's struct flag; refuse it here."""
    for group in cfg:
        node = schema.GROUPS.get(str(group))
        if node is None and group not in _ROOT_FIELDS:
            raise _unknown_key(str(group))
        if node is not None:
            allowed = {f.name for f in dataclasses.fields(node)}
            extra = [k for k in cfg[group] if k not in allowed]
            if extra:
                raise _unknown_key(f"{group}.{extra[0]}")


_ROOT_FIELDS = {f.name for f in dataclasses.fields(schema.RunConfig)}


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text)


def _missing_option(exc: MissingConfigException) -> ConfigError:
    text = str(exc)
    found = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
    if not found:
        return ConfigError("config", _first_line(text))
    group, name = found.groups()
    options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    return ConfigError(group, f"no option '{name}' (allowed: {', '.join(options)})")


def _from_composition(exc: ConfigCompositionException, overrides) -> ConfigError:
    cause = exc.__cause__ or exc
    if isinstance(cause, OmegaConfBaseException):
        return _from_omegaconf(cause)
    found = re.search(r"override '([^']+)'", str(exc))
    if found:
        return _unknown_key(found.group(1))
    return ConfigError("overrides", _first_line(str(exc)))


def _from_omegaconf(exc: OmegaConfBaseException) -> ConfigError:
    key = getattr(exc, "full_key", None) or "config"
    text = _first_line(str(exc))
    if "not in" in text or "Key '" in text and "not" in text:
        return _unknown_key(key)
    # OmegaConf's first line is already of the form "Value 'x' of type 'str' could not be ..."
    return ConfigError(key, text)


def _unknown_key(full_key: str) -> ConfigError:
    """Name the misspelt key and list the keys its group does have."""
    parts = full_key.lstrip("+~").split(".")
    node: type | None = schema.RunConfig
    for part in parts[:-1]:
        fields = {f.name: f for f in dataclasses.fields(node)} if node else {}
        node = schema.GROUPS.get(part) if part in fields else None
        if node is None:
            break
    if node is None:
        allowed = [f.name for f in dataclasses.fields(schema.RunConfig)]
        return ConfigError(parts[0], f"no such key (allowed: {', '.join(allowed)})")
    allowed = [f.name for f in dataclasses.fields(node)]
    return ConfigError(".".join(parts), f"no such key (allowed: {', '.join(allowed)})")
