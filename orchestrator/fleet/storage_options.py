"""A cluster's fsspec storage options: the config's own, its secret ones, the local S3 endpoint.

The secret options (keys) come from a file or an environment variable named in the config and
are read only when a store is opened: the config, and so the SQLite state, the logs and every
run config, holds the file's path or the variable's name, never the keys themselves.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.config import ConfigError

# Every call to the local S3 server is bounded: s3fs otherwise waits on botocore's defaults.
# No region: botocore signs for us-east-1 by default, and s3fs would send any region it is
# given as a location constraint when it creates a bucket, which us-east-1 refuses.
LOCAL_S3_DEFAULTS: dict[str, Any] = {
    "config_kwargs": {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3}},
}


def merge_storage_options(
    public: Mapping[str, Any],
    secret: Mapping[str, Any],
    endpoint_url: str | None = None,
) -> dict[str, Any]:
    """The options s3fs (or any fsspec store) opens the cluster's storage root with.

    Later sources win key by key, nested dicts (client_kwargs, config_kwargs) merged: local S3
    defaults, then the config's options, then the secret ones; a local S3 endpoint last, since
    it is where the fleet's own server listens."""
    merged: dict[str, Any] = {}
    if endpoint_url:
        merged = _deep_merge(merged, LOCAL_S3_DEFAULTS)
    merged = _deep_merge(merged, public)
    merged = _deep_merge(merged, secret)
    if endpoint_url:
        # s3fs 2026.9 takes endpoint_url itself (it wins over client_kwargs' own).
        merged["endpoint_url"] = endpoint_url
    return merged


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = dict(value) if isinstance(value, Mapping) else value
    return out


def read_credentials(
    key: str, file: str | None, env: str | None, environ: Mapping[str, str] = os.environ
) -> dict[str, Any]:
    """The JSON object of secret options in `file` or in the variable `env` ({} if neither is
    named). `key` is the cluster's config key, e.g. fleet.clusters.partner; a source that is
    missing, unreadable or not a JSON object is a ConfigError naming it."""
    if file:  # validate_fleet refuses a cluster that names both
        where, path = f"{key}.storage_credentials_file", Path(file).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(where, f"cannot read {path}: {exc.strerror}") from None
        return _json_object(where, text, f"{path}")
    if env:
        where = f"{key}.storage_credentials_env"
        text = environ.get(env, "").strip()
        if not text:
            raise ConfigError(where, f"the environment variable {env} is not set")
        return _json_object(where, text, f"${env}")
    return {}


def _json_object(where: str, text: str, source: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        value = None  # the message must not quote the text: it holds the keys
    if not isinstance(value, dict):
        raise ConfigError(where, f"{source} must hold a JSON object of fsspec options")
    return value
