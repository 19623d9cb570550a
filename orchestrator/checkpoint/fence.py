"""The job's fence: one small file on a cluster's storage naming the newest attempt's epoch.

The controller writes it (write_fence) before it starts an attempt there; rank 0 of every attempt
reads it (read_fence) before each save and each commit (it never prunes: the controller does).
An attempt that finds a newer epoch than its own is a zombie (its cluster was declared lost and
the job moved on) and stops without touching the checkpoints again (Fenced). Storage is the one thing a partitioned attempt and the
controller still share, which is why the fence lives there and not in the controller's database.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from orchestrator.checkpoint.storage import open_root


class Fenced(Exception):
    """A newer attempt of the job exists: this one must commit and delete nothing."""

    def __init__(self, epoch: int, fence_epoch: int) -> None:
        # Everything goes to Exception so the error pickles (Ray re-raises it on the driver).
        super().__init__(epoch, fence_epoch)
        self.epoch = epoch
        self.fence_epoch = fence_epoch

    def __str__(self) -> str:
        return (
            f"fenced: this attempt has epoch {self.epoch}, the job's fence says epoch "
            f"{self.fence_epoch}; a newer attempt owns the checkpoints"
        )


def _check_epoch(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def _bounded(what: str, call: Callable[[], Any], timeout_s: float) -> Any:
    """``call()``'s result, or OSError naming ``what`` if it fails or outlasts ``timeout_s``."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = call()
        except BaseException as e:  # reported to the caller's thread below
            result["error"] = e

    # A daemon thread: a store that never answers must not keep the process alive either.
    worker = threading.Thread(target=run, name="fence-io", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise OSError(f"{what} timed out after {timeout_s:g}s")
    if "error" in result:
        e = result["error"]
        if isinstance(e, FileNotFoundError):
            raise e
        raise OSError(f"{what} failed: {type(e).__name__}: {e}") from e
    return result.get("value")


def write_fence(
    url: str,
    storage_options: dict[str, Any] | None,
    epoch: int,
    attempt: int,
    timeout_s: float = 30.0,
) -> None:
    """Set the job's fence to ``epoch`` (of attempt number ``attempt``), written whole at once.

    On an object store one put is atomic; on a local disk the file is written beside and
    renamed, so a reader never sees half of it. OSError naming the URL if it fails or times out.
    """
    _check_epoch("epoch", epoch)
    _check_epoch("attempt", attempt)
    data = json.dumps({"epoch": epoch, "attempt": attempt}).encode()

    def write() -> None:
        fs, path = open_root(url, storage_options)
        if not isinstance(fs, LocalFileSystem):
            fs.pipe_file(path, data)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        staged = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(staged, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staged, path)

    try:
        _bounded(f"writing the fence {url}", write, timeout_s)
    except FileNotFoundError as e:
        raise OSError(f"writing the fence {url} failed: {e}") from e


def _parse(url: str, raw: bytes) -> int:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OSError(f"fence {url} is not JSON ({e})") from None
    epoch = doc.get("epoch") if isinstance(doc, dict) else None
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        raise OSError(f"fence {url} holds no integer epoch: {raw[:200]!r}")
    return epoch


def read_fence(
    url: str, storage_options: dict[str, Any] | None, timeout_s: float = 30.0
) -> int | None:
    """The epoch the fence holds; None if there is no fence file.

    A read that fails, times out or finds something that is not a fence raises OSError naming the
    URL: an attempt that cannot tell whether it is fenced must not commit either.
    """

    def read() -> bytes:
        fs, path = open_root(url, storage_options)
        fs.invalidate_cache(path)  # another host wrote it; a cached listing would hide it
        return fs.cat_file(path)

    try:
        raw = _bounded(f"reading the fence {url}", read, timeout_s)
    except FileNotFoundError:
        return None
    return _parse(url, raw)
