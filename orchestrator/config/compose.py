"""Compose conf/ with the typed schema and turn Hydra's exceptions into one ConfigError line.

Spillway's own config groups ship inside the package (orchestrator/conf). A user adds groups
of their own (MYDIR/fleet/mine.yaml, MYDIR/model/huge.yaml) with SPILLWAY_CONFIG_DIR, which
`spillway --config-dir DIR` sets: Hydra searches it after Spillway's own.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orchestrator.config import schema
from orchestrator.config.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
PRIMARY = "train"
CONFIG_DIR_ENV = "SPILLWAY_CONFIG_DIR"


def spillway_home() -> str:
    """The one directory holding all of Spillway's state ($SPILLWAY_HOME, default ~/.spillway)."""
    return str(Path(os.environ.get("SPILLWAY_HOME", "~/.spillway")).expanduser().resolve())


def ensure_state_dir(state_dir: str) -> Path:
    """The state dir, created readable by its owner only: it holds tokens and storage keys.
    One that exists is left as it is (its owner chose its mode)."""
    path = Path(state_dir).expanduser()
    if not path.is_dir():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)  # mkdir's mode passes through the umask
    return path


def user_config_dir(source: str = CONFIG_DIR_ENV) -> Path | None:
    """The user's own config directory, from $SPILLWAY_CONFIG_DIR; None when unset. `source`
    names where it came from in the one line that refuses a directory that is not there."""
    value = os.environ.get(CONFIG_DIR_ENV, "").strip()
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(
            source,
            f"{value} is not a directory (a folder of config groups, e.g. "
            "DIR/fleet/mine.yaml for fleet=mine)",
        )
    _refuse_shadowing(path, source)
    return path


def _refuse_shadowing(user_dir: Path, source: str) -> None:
    """A user file named like one of Spillway's own would be silently ignored (Hydra takes the
    first it finds): refuse it instead."""
    for own in sorted(CONF_DIR.glob("*/*.yaml")):
        theirs = user_dir / own.parent.name / own.name
        if theirs.is_file():
            group, name = own.parent.name, own.stem
            raise ConfigError(
                source,
                f"{theirs} has the name of Spillway's own {group}={name}; give it another name",
            )


def _search_path(user_dir: Path | None) -> list[str]:
    """The override that adds the user's directory to Hydra's search path, if there is one."""
    if user_dir is None:
        return []
    quoted = str(user_dir).replace("'", "\\'")  # Hydra's quoted strings escape only quotes
    return [f"hydra.searchpath=['file://{quoted}']"]


def _register_once() -> None:
    if not OmegaConf.has_resolver("spillway_home"):
        OmegaConf.register_new_resolver("spillway_home", spillway_home)
    schema.register()


def compose_run(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The run config for these Hydra overrides, fully resolved; ConfigError if it is bad."""
    _register_once()
    user_dir = user_config_dir()
    _refuse_keyless_and_hydra(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=PRIMARY, overrides=[*_search_path(user_dir), *overrides])
        _resolve(cfg)
        _refuse_missing(cfg)
        _refuse_unknown_keys(cfg)
    except MissingConfigException as exc:
        raise _missing_option(exc, user_dir) from None
    except OverrideParseException as exc:
        raise ConfigError("overrides", first_line(str(exc))) from None
    except ConfigCompositionException as exc:
        raise _from_composition(exc, overrides) from None
    except OmegaConfBaseException as exc:
        raise _from_omegaconf(exc) from None
    except yaml.YAMLError as exc:
        raise _from_yaml(exc) from None
    except ConfigError:
        raise
    except ValueError as exc:  # Hydra's own refusals of an override it parsed, e.g. "+=1"
        raise ConfigError("overrides", first_line(str(exc))) from None
    return cfg


# What a run config override looks like before Hydra reads it: [+|++|~]KEY[@PACKAGE][=VALUE].
_OVERRIDE_KEY = re.compile(r"^(~|\+{1,2})?([^=@]*)")


def _refuse_keyless_and_hydra(overrides: list[str] | tuple[str, ...]) -> None:
    """An override with no key reaches Hydra internals that raise bare ValueErrors; one of
    Hydra's own settings (hydra.searchpath, say) would change how Spillway composes, and is
    not part of the run config anyway."""
    for override in overrides:
        key = _OVERRIDE_KEY.match(override).group(2).strip()
        if not key:
            raise ConfigError("overrides", f"'{override}' names no key (allowed: KEY=VALUE)")
        if key == "hydra" or key.startswith("hydra."):
            raise ConfigError(
                key,
                "Hydra's own settings are not part of a run config (allowed: the run config's "
                "keys; your own config groups come in with --config-dir)",
            )


def _resolve(cfg: DictConfig) -> None:
    """OmegaConf.resolve, whose errors do not say which key held the bad interpolation."""
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        key = _unresolvable_key(cfg)
        if key is None:
            raise
        raise ConfigError(key, first_line(str(exc))) from None


def _unresolvable_key(node: DictConfig | ListConfig, prefix: str = "") -> str | None:
    """The first key (in order) whose value cannot be resolved."""
    is_list = isinstance(node, ListConfig)
    for key in range(len(node)) if is_list else list(node):
        full = f"{prefix}[{key}]" if is_list else f"{prefix}.{key}" if prefix else str(key)
        try:
            value = node[key]
        except OmegaConfBaseException:
            return full
        if isinstance(value, (DictConfig, ListConfig)):
            found = _unresolvable_key(value, full)
            if found is not None:
                return found
    return None


def _refuse_missing(cfg: DictConfig, prefix: str = "") -> None:
    for key in cfg:
        full = f"{prefix}{key}"
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(full, f"is required; set it on the command line, e.g. {full}=VALUE")
        value = cfg[key]
        if isinstance(value, DictConfig):
            _refuse_missing(value, f"{full}.")


def _refuse_unknown_keys(cfg: DictConfig, node: type = schema.RunConfig, prefix: str = "") -> None:
    """A `+group.key=...` override slips past the schema's struct flag; refuse it here."""
    fields = _fields(node)
    for key in cfg:
        full = f"{prefix}{key}"
        if fields is not None and key not in fields:
            raise unknown_key(full)
        child = fields[key] if fields is not None else _dict_value_type(node)
        value = cfg[key]
        if isinstance(value, DictConfig) and child is not None:
            _refuse_unknown_keys(value, child, f"{full}.")


def first_line(text: str) -> str:
    """The first non-empty line of an error's text: a ConfigError is one line."""
    return next((line.strip() for line in text.splitlines() if line.strip()), text)


def options(group: str, user_dir: Path | None = None) -> list[str]:
    """The options of a config group: Spillway's own and the user's."""
    dirs = [CONF_DIR, *([user_dir] if user_dir is not None else [])]
    return sorted({p.stem for d in dirs for p in (d / group).glob("*.yaml")})


def _missing_option(exc: MissingConfigException, user_dir: Path | None) -> ConfigError:
    text = str(exc)
    found = re.search(r"Could not find '([^'/]+)/([^']*)'", text)
    if not found:
        return ConfigError("config", first_line(text))
    group, name = found.groups()
    allowed = options(group, user_dir)
    return ConfigError(group, f"no option '{name}' (allowed: {', '.join(allowed)})")


def _from_composition(exc: ConfigCompositionException, overrides) -> ConfigError:
    cause = exc.__cause__ or exc
    if isinstance(cause, OmegaConfBaseException):
        return _from_omegaconf(cause)
    in_file = _in_group_file(str(exc))
    if in_file is not None:
        return in_file
    found = re.search(r"override '([^']+)'", str(exc))
    if found:
        return unknown_key(found.group(1))
    return ConfigError("overrides", first_line(str(exc)))


def _in_group_file(text: str) -> ConfigError | None:
    """Hydra reports a bad value or key inside a group file (the user's fleet file, say) as
    "In 'fleet/mine': ValidationError raised ...", the key only further down: name the key."""
    found = re.match(r"In '([^']+)': (\w+) raised while composing config:\n(.*)", text, re.S)
    if not found:
        return None
    source, kind, rest = found.groups()
    key = re.search(r"^\s*full_key: (.*)$", text, re.M)
    # Without a key (a list where a mapping goes, say), the file's group is what is wrong.
    full_key = key.group(1).strip() if key else ""
    if kind == "ConfigKeyError" and full_key:
        return unknown_key(full_key)
    return ConfigError(full_key or source.split("/")[0], f"{first_line(rest)} (in {source})")


def _from_yaml(exc: yaml.YAMLError) -> ConfigError:
    """A group file that is not YAML: name its group and where it breaks."""
    mark = getattr(exc, "problem_mark", None)
    path = Path(mark.name) if mark is not None and mark.name else None
    group = path.parent.name if path is not None else "config"
    where = f"{path} line {mark.line + 1}, column {mark.column + 1}" if path is not None else ""
    problem = getattr(exc, "problem", None) or first_line(str(exc))
    return ConfigError(group, f"{where}: not valid YAML ({problem})".lstrip(": "))


def _from_omegaconf(exc: OmegaConfBaseException) -> ConfigError:
    key = getattr(exc, "full_key", None) or "config"
    text = first_line(str(exc))
    if "not in" in text or "Key '" in text and "not" in text:
        return unknown_key(key)
    # OmegaConf's first line is already of the form "Value 'x' of type 'str' could not be ..."
    return ConfigError(key, text)


def _unwrap(tp: Any) -> Any:
    """`X | None` -> X, so optional nested configs are walked like required ones."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    is_union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    return args[0] if is_union and len(args) == 1 else tp


def _fields(node: Any) -> dict[str, Any] | None:
    """A dataclass's field types by name; None for anything else (a dict takes any key)."""
    if not dataclasses.is_dataclass(node):
        return None
    return {k: _unwrap(v) for k, v in typing.get_type_hints(node).items()}


def _dict_value_type(node: Any) -> Any:
    return _unwrap(typing.get_args(node)[1]) if typing.get_origin(node) is dict else None


def unknown_key(full_key: str) -> ConfigError:
    """Name the first part of the key the schema lacks and list what its parent does have."""
    parts = full_key.lstrip("+~").split(".")
    node: Any = schema.RunConfig
    for i, part in enumerate(parts):
        fields = _fields(node)
        if fields is None:
            node = _dict_value_type(node)
            if node is None:
                break
            continue
        if part not in fields:
            key = ".".join(parts[: i + 1])
            return ConfigError(key, f"no such key (allowed: {', '.join(fields)})")
        node = fields[part]
    return ConfigError(".".join(parts), "no such key")
