"""What a fleet description must satisfy before anything is started, submitted or placed.

`validate_fleet` is the one check, run alike by the CLI (launch, fleet up/down/status) and by
the controller when it starts (`controller_fleet`) and on every submission (admission): a fleet
the CLI refuses is refused by the controller with the same line. It is pure: no file, no
environment, no clock, so both sides give the same answer wherever they run. Anything it
accepts must not raise later in the controller's loop.

`validate_fleet_sources` is the part that depends on the machine: the token and credential
sources a remote cluster names can be read here. Only the controller runs it, where they are
read; a laptop need not hold the head's secrets.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from orchestrator.config import ConfigError
from orchestrator.config.compose import first_line, unknown_key
from orchestrator.config.schema import FleetConfig
from orchestrator.fleet.environment import controller_cluster
from orchestrator.fleet.leases import is_offset, resolve_time
from orchestrator.fleet.storage_options import read_credentials
from orchestrator.fleet.tokens import read_token

# Fleet and cluster names become file and directory names (fleet/NAME/CLUSTER.json, the Ray
# temp dir ray/CLUSTER, whose socket paths Ray limits) and Hydra keys: letters, digits, - and _.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
NAME_RULE = "1-32 letters, digits, - or _, starting with a letter or digit"
# Beside each cluster's record and dir in fleet/NAME/ `fleet up` keeps these: a cluster of
# that name would share their paths (s3/: the S3 server; controller/: the API's token; up_at:
# the anchor; s3-server: the server's line in what `fleet up` reports).
RESERVED_CLUSTER_NAMES = ("controller", "s3", "s3-server", "up_at")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
KINDS = ("owned", "leased")
# Stores that live inside one process: the controller and the ranks would each see their own.
PRIVATE_PROTOCOLS = ("memory",)
# fsspec options that are credentials (s3fs, adlfs, gcsfs, and boto's client_kwargs): in
# storage_options they would be copied into every run config, the state and the logs.
CREDENTIAL_OPTIONS = frozenset(
    {
        "key", "secret", "password", "session_token", "aws_access_key_id",
        "aws_secret_access_key", "aws_session_token", "account_key", "sas_token",
        "client_secret", "connection_string",
    }
)  # fmt: skip
# The fleet's durations, each > 0 (a zero or negative one declares every cluster lost at once,
# or never waits for a submit or a copy).
DURATIONS = (
    "lost_after_s",
    "refused_lost_after_s",
    "submit_deadline_s",
    "copy_deadline_s",
    "events_retention_s",
)


def validate_fleet(fleet: DictConfig) -> None:
    """ConfigError(key, what is allowed) for the first thing wrong with the fleet."""
    _check_name("fleet.name", fleet.name)
    for field in DURATIONS:
        if field in fleet:
            _positive(f"fleet.{field}", fleet[field])
    _check_controller(fleet.controller)
    if not fleet.clusters:
        raise ConfigError("fleet.clusters", "names no cluster (allowed: one or more clusters)")
    host = controller_cluster(fleet)
    for name, c in fleet.clusters.items():
        key = f"fleet.clusters.{name}"
        if name in RESERVED_CLUSTER_NAMES:
            raise ConfigError(
                key,
                f"'{name}' is a name `fleet up` keeps for itself beside the clusters "
                f"(allowed: any other name; not {', '.join(RESERVED_CLUSTER_NAMES)})",
            )
        _check_name(key, name)
        if not isinstance(c, DictConfig):
            raise ConfigError(key, "must be a mapping of the cluster's settings")
        _check_cluster(key, c)
        _check_lease(key, c)
        _check_storage(key, c)
        _check_local_shape(key, c, is_controller_host=name == host)
    if host is None:
        raise ConfigError(
            "fleet.clusters",
            "names no owned cluster (the controller runs on the first owned one: home)",
        )
    _check_unique(fleet, "dashboard_url", "each cluster has its own dashboard")
    _check_unique(fleet, "address", "each cluster has its own head")
    _check_unique(
        fleet,
        "storage_root",
        "each cluster keeps its checkpoints under its own root; clusters that share a bucket "
        "use different prefixes",
        remote_only=False,
    )


def typed_fleet(data: Mapping[str, Any]) -> DictConfig:
    """A fleet sent as plain data (the CLI's composed fleet, as JSON) on the typed schema,
    resolved; ConfigError names the key, as composing the same fleet file would."""
    if not isinstance(data, Mapping):
        raise ConfigError("fleet", "must be a mapping (the fleet config)")
    try:
        fleet = OmegaConf.merge(OmegaConf.structured(FleetConfig), dict(data))
        OmegaConf.resolve(fleet)
    except OmegaConfBaseException as exc:
        raise _typing_error(exc) from None
    for name, c in fleet.clusters.items():
        if isinstance(c, DictConfig) and OmegaConf.is_missing(c, "storage_root"):
            raise ConfigError(f"fleet.clusters.{name}.storage_root", "is required")
    return fleet


def validate_fleet_sources(fleet: DictConfig, environ: Mapping[str, str] = os.environ) -> None:
    """ConfigError unless every token and credential source the fleet names can be read on
    this machine (a local cluster's token, and a local_s3 one's keys, come from `fleet up`).
    Without this, a missing file would raise on every tick of the controller (credentials) or
    make a healthy cluster look lost (a token it cannot send)."""
    for name, c in fleet.clusters.items():
        key = f"fleet.clusters.{name}"
        if not c.local_s3:
            read_credentials(key, c.storage_credentials_file, c.storage_credentials_env, environ)
        if c.local:
            continue
        if (c.token_path or c.token_env) and not _token_readable(c, environ):
            where = "token_path" if c.token_path else "token_env"
            source = (
                f"no token file at {c.token_path}"
                if c.token_path
                else f"the environment variable {c.token_env} is not set"
            )
            raise ConfigError(f"{key}.{where}", f"{source} (the cluster's Ray token)")


def controller_fleet(
    data: Mapping[str, Any], environ: Mapping[str, str] = os.environ
) -> DictConfig:
    """What the controller runs on, from the fleet it was started with: typed, validated as the
    CLI validates it, and its secrets readable here; ConfigError (one line) otherwise."""
    fleet = typed_fleet(data)
    validate_fleet(fleet)
    validate_fleet_sources(fleet, environ)
    return fleet


# ---- the parts ---------------------------------------------------------------------------


def _check_name(key: str, name: Any) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(key, f"'{name}' is not a usable name (allowed: {NAME_RULE})")


def _positive(key: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(key, f"must be a finite number > 0, got {value}")


def _check_controller(c: DictConfig) -> None:
    if c.port is not None and not 1 <= c.port <= 65535:
        raise ConfigError("fleet.controller.port", f"must be null or in 1..65535, got {c.port}")
    if not str(c.host or "").strip():
        raise ConfigError("fleet.controller.host", "is empty (allowed: an address, 127.0.0.1)")
    if c.url is not None:
        _check_url("fleet.controller.url", c.url, "the controller's API")
    _check_secret_sources("fleet.controller", c)


def _check_cluster(key: str, c: DictConfig) -> None:
    if c.kind not in KINDS:
        raise ConfigError(f"{key}.kind", f"'{c.kind}' is not allowed (allowed: owned, leased)")
    if c.devices < 1:
        raise ConfigError(f"{key}.devices", f"must be >= 1, got {c.devices}")
    if not math.isfinite(c.cost_per_device_hour) or c.cost_per_device_hour < 0:
        raise ConfigError(
            f"{key}.cost_per_device_hour",
            f"must be a finite number >= 0, got {c.cost_per_device_hour}",
        )
    for field, allowed in (
        ("device_type", "a device type such as cpu or h100"),
        ("device_resource", "GPU or a custom resource name"),
    ):
        value = str(c[field] or "")
        if not value.strip() or any(ch.isspace() for ch in value):
            raise ConfigError(f"{key}.{field}", f"'{value}' is not allowed (allowed: {allowed})")
    if not c.local:
        if not c.address:
            raise ConfigError(
                f"{key}.address", "a cluster not started locally needs address and dashboard_url"
            )
        if not c.dashboard_url:
            raise ConfigError(
                f"{key}.dashboard_url",
                "a cluster not started locally needs address and dashboard_url",
            )
        _check_address(f"{key}.address", c.address)
        _check_url(f"{key}.dashboard_url", c.dashboard_url, "the cluster's Ray dashboard")
    _check_secret_sources(key, c)


def _check_address(key: str, address: str) -> None:
    host, _, port = str(address).removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(key, f"'{address}' is not allowed (allowed: HOST:PORT of the Ray head)")


def _check_url(key: str, url: str, what: str) -> None:
    try:
        parts = urlsplit(str(url))
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in range
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, f"'{url}' is not allowed (allowed: http(s)://HOST:PORT of {what})")


def _check_secret_sources(key: str, c: DictConfig) -> None:
    """Paths are read where their reader runs (CLI, controller, ranks), each from its own
    working directory: only an absolute path (or ~) names the same file for all of them."""
    paths = [("token_path", c.token_path)]
    envs = [("token_env", c.token_env)]
    if "storage_credentials_file" in c:
        paths.append(("storage_credentials_file", c.storage_credentials_file))
        envs.append(("storage_credentials_env", c.storage_credentials_env))
    for field, path in paths:
        if path is not None and not os.path.isabs(os.path.expanduser(str(path))):
            raise ConfigError(
                f"{key}.{field}", f"'{path}' is relative (allowed: an absolute path, or ~/...)"
            )
    for field, name in envs:
        if name is not None and not ENV_NAME.fullmatch(str(name)):
            raise ConfigError(
                f"{key}.{field}",
                f"'{name}' is not an environment variable's name (allowed: letters, digits, _)",
            )


def _check_lease(key: str, c: DictConfig) -> None:
    if c.kind != "leased":
        for field in ("lease_start", "lease_end"):
            if c[field] is not None:
                raise ConfigError(
                    f"{key}.{field}",
                    "is set on an owned cluster (only a leased one has a lease window)",
                )
        return
    if c.lease_end is None:
        raise ConfigError(
            f"{key}.lease_end", "a leased cluster needs a lease end (e.g. +30m or an ISO time)"
        )
    if c.lease_start is None and not c.local:
        raise ConfigError(
            f"{key}.lease_start",
            "a leased cluster not started locally needs a lease start (an ISO-8601 time); "
            "only a local one's lease starts at `fleet up`",
        )
    resolved = {}
    for field in ("lease_start", "lease_end"):
        try:
            resolved[field] = resolve_time(c[field], 0.0)
        except ValueError as exc:
            raise ConfigError(f"{key}.{field}", str(exc)) from None
        if c[field] is not None and is_offset(c[field]) and not c.local:
            raise ConfigError(
                f"{key}.{field}",
                f"'{c[field]}' counts from `fleet up`, which starts local clusters only "
                "(allowed: an ISO-8601 time)",
            )
    start, end = c.lease_start, c.lease_end
    # A missing start is `fleet up` (offset 0); an offset and an ISO time cannot be compared
    # before the fleet is up.
    start = "+0s" if start is None else start
    if is_offset(start) == is_offset(end):
        s, e = resolve_time(start, 0.0), resolve_time(end, 0.0)
        if e <= s:
            raise ConfigError(f"{key}.lease_end", f"'{end}' is not after lease_start '{start}'")


def _check_storage(key: str, c: DictConfig) -> None:
    root = str(c.storage_root or "")
    if "://" in root:
        import fsspec

        # A chained URL (simplecache::s3://...) names one protocol per link.
        protocols = [part.split("://", 1)[0] for part in root.split("::") if "://" in part]
        known = set(fsspec.available_protocols())
        if any(p not in known for p in protocols):
            raise ConfigError(
                f"{key}.storage_root",
                f"'{root}' is not a URL fsspec knows (allowed: s3://BUCKET/PATH, gs://..., "
                "file:///PATH, or an absolute path)",
            )
        if not root.rsplit("://", 1)[1].strip("/"):
            raise ConfigError(
                f"{key}.storage_root", f"'{root}' names no bucket or path (e.g. s3://BUCKET/PATH)"
            )
        private = [p for p in protocols if p in PRIVATE_PROTOCOLS]
        if private:
            raise ConfigError(
                f"{key}.storage_root",
                f"'{root}' lives inside one process; the controller and the ranks would not "
                "share it (allowed: a store both reach, s3://... or an absolute path)",
            )
    elif not os.path.isabs(root):
        raise ConfigError(
            f"{key}.storage_root",
            f"'{root}' is not an absolute path (allowed: an fsspec URL such as "
            "s3://BUCKET/PATH, or an absolute path)",
        )
    if not isinstance(c.storage_options, DictConfig):
        raise ConfigError(f"{key}.storage_options", "must be a mapping of fsspec options")
    _refuse_credentials(f"{key}.storage_options", c.storage_options)
    if c.storage_credentials_file and c.storage_credentials_env:
        raise ConfigError(
            f"{key}.storage_credentials_env",
            "is set beside storage_credentials_file (allowed: one of them)",
        )
    if not c.local_s3:
        return
    if not c.local:
        raise ConfigError(
            f"{key}.local_s3", "only a local cluster uses the fleet's S3 server (set local: true)"
        )
    if not root.startswith("s3://") or not root[5:].split("/")[0]:
        raise ConfigError(
            f"{key}.storage_root",
            f"'{c.storage_root}' is not on the fleet's S3 server (allowed: s3://BUCKET/...)",
        )
    if "endpoint_url" in (c.storage_options or {}):
        raise ConfigError(
            f"{key}.storage_options.endpoint_url",
            "is set on a local_s3 cluster, whose endpoint is the fleet's own S3 server",
        )


def _refuse_credentials(key: str, options: DictConfig) -> None:
    for name, value in options.items():
        if str(name).lower() in CREDENTIAL_OPTIONS:
            raise ConfigError(
                f"{key}.{name}",
                "is a credential: storage_options go into every run config (allowed: "
                "storage_credentials_file or storage_credentials_env, read where it is used)",
            )
        if isinstance(value, DictConfig):
            _refuse_credentials(f"{key}.{name}", value)


def _check_local_shape(key: str, c: DictConfig, is_controller_host: bool) -> None:
    if c.nodes < 1:
        raise ConfigError(f"{key}.nodes", f"must be >= 1, got {c.nodes}")
    if c.nodes > 1 and not c.local:
        raise ConfigError(
            f"{key}.nodes", "only a local cluster is started with nodes (set local: true)"
        )
    if c.devices % c.nodes:
        raise ConfigError(
            f"{key}.nodes", f"{c.nodes} nodes cannot split {c.devices} devices evenly"
        )
    if c.num_cpus is not None and (c.num_cpus < c.nodes or c.num_cpus % c.nodes):
        raise ConfigError(
            f"{key}.num_cpus", f"{c.num_cpus} CPUs cannot be split evenly over {c.nodes} nodes"
        )
    if c.isolated and not c.local:
        raise ConfigError(
            f"{key}.isolated", "only a local cluster is started isolated (set local: true)"
        )
    if c.isolated and is_controller_host:
        raise ConfigError(
            f"{key}.isolated",
            "the controller's cluster (the first owned one) needs its state dir: not isolated",
        )


def _check_unique(fleet: DictConfig, field: str, why: str, remote_only: bool = True) -> None:
    """Two clusters at one dashboard, head or storage root would be booked and watched as two,
    and a migration between them would copy a checkpoint onto itself."""
    seen: dict[str, str] = {}
    for name, c in fleet.clusters.items():
        if remote_only and c.local:
            continue  # `fleet up` gives each local cluster its own
        value = c[field]
        if not value:
            continue
        norm = str(value).strip().rstrip("/").lower()
        if norm in seen:
            raise ConfigError(
                f"fleet.clusters.{name}.{field}",
                f"'{value}' is also cluster {seen[norm]}'s ({why})",
            )
        seen[norm] = name


def _token_readable(c: DictConfig, environ: Mapping[str, str]) -> bool:
    if c.token_env and environ.get(c.token_env, "").strip():
        return True
    return bool(c.token_path and read_token(c.token_path, None))


def _typing_error(exc: OmegaConfBaseException) -> ConfigError:
    """The line composing the same fleet file gives (orchestrator.config.compose)."""
    key = getattr(exc, "full_key", None)
    key = f"fleet.{key}" if key else "fleet"
    if isinstance(exc, ConfigKeyError):
        return unknown_key(key)
    return ConfigError(key, first_line(str(exc)))


__all__ = [
    "CREDENTIAL_OPTIONS",
    "DURATIONS",
    "NAME",
    "RESERVED_CLUSTER_NAMES",
    "controller_fleet",
    "typed_fleet",
    "validate_fleet",
    "validate_fleet_sources",
]
