"""Thin helpers over fsspec so checkpoint code never assumes a local filesystem.

Every function takes an fsspec filesystem plus a path spelled the way that filesystem
spells it (no protocol prefix), which is what :func:`open_root` returns.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec


def open_root(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve a storage URL (``s3://b/x``, ``memory://x``) or a plain local path.

    ``storage_options`` go to the filesystem (an endpoint, credentials); without them a
    store is opened the way its library finds them itself (AWS_* variables for S3)."""
    if "://" not in url and "::" not in url:
        # A relative path would silently depend on each worker's cwd, which differs
        # between the launcher and Ray actors; pin it down once, here.
        url = os.path.abspath(os.path.expanduser(url))
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    # Trailing slashes would make string-built child paths inconsistent with what
    # fs.ls/fs.find return, breaking prefix-based relativisation.
    return fs, path.rstrip("/") or "/"


def join(*parts: str) -> str:
    """Join path segments with '/' regardless of the host OS (fs paths are always posix)."""
    if not parts:
        raise ValueError("join() needs at least one part")
    out = parts[0]
    for part in parts[1:]:
        part = part.strip("/")
        if not part:
            continue
        out = f"{out.rstrip('/')}/{part}" if out else part
    return out


def remove_tree(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Delete ``path`` recursively; a missing path is not an error (cleanup is idempotent)."""
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except FileNotFoundError:
        # Another process removed it between exists() and rm(); the goal is reached.
        pass


def rename_dir(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Move directory ``src`` to ``dst``; atomic on local filesystems (os.rename).

    Object stores implement this as copy + delete, so it is not atomic there; the
    manifest check, not the rename, is what makes a checkpoint trustworthy.
    """
    if fs.exists(dst):
        # Local mv (shutil.move) would nest src *inside* an existing dst, while object
        # stores would merge; refuse so every backend behaves the same.
        raise FileExistsError(f"rename target already exists: {dst}")
    fs.mv(src, dst, recursive=True)
