"""Each cluster's Ray auth token: read from a file or an environment variable, never logged."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def new_token_file(path: Path) -> Path:
    """Write a fresh random token readable only by its owner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_TRUNC
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def read_token(token_path: str | None, token_env: str | None) -> str | None:
    if token_env:
        value = os.environ.get(token_env, "").strip()
        if value:
            return value
    if token_path:
        path = Path(token_path).expanduser()
        if path.is_file():
            return path.read_text().strip() or None
    return None


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}
