"""The run files of one attempt: what the recipe, the driver, the controller and the CLI exchange.

Every file of an attempt's directory is named here and read and written here, through fsspec, so
the run dir may be a local path or any store (``s3://``, ``memory://``). Object stores cannot
append or rename atomically, so each file is written whole (one PUT) and metrics go out in
segments:

    run_config.json          the resolved run config this attempt trains, as stored at launch
    DRAIN                    the drain request: its text is the reason
    DRAINED.json             the drain acknowledgement: {step, reason, at}, once that step is committed
    last_save.json           the last committed save: {step, seconds, at}
    metrics/segment-NNNNNN.jsonl
                             one JSON object per optimizer step; a segment is rewritten whole
                             until it reaches SEGMENT_BYTES, then the next one begins
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from orchestrator.checkpoint.storage import join, open_root

RUN_CONFIG = "run_config.json"
DRAIN_REQUEST = "DRAIN"
DRAIN_ACK = "DRAINED.json"
LAST_SAVE = "last_save.json"
METRICS_DIR = "metrics"
SEGMENT_BYTES = 1 << 20

# A reader that finds no metrics should not mistake an empty store for a broken one.
_SEGMENT_PREFIX = "segment-"


def segment_name(index: int) -> str:
    return f"{METRICS_DIR}/{_SEGMENT_PREFIX}{index:06d}.jsonl"


def parse_lines(text: str) -> list[dict[str, Any]]:
    """The whole JSON lines of a metrics text; one cut short by a crash is left out."""
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class RunDir:
    """One attempt's run dir on some store; ``storage_options`` open that store (credentials)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.fs, self.path = open_root(url, storage_options)

    def __repr__(self) -> str:
        return f"RunDir({self.url!r})"

    # ---- one whole file at a time ----------------------------------------------------------

    def _put(self, name: str, data: bytes) -> None:
        """Write a file whole: a reader sees the old bytes or the new, never a part."""
        path = join(self.path, name)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if isinstance(self.fs, LocalFileSystem):
            part = f"{path}.part"
            self.fs.pipe_file(part, data)
            os.replace(part, path)  # a rename is atomic on a local disk
        else:
            self.fs.pipe_file(path, data)  # one PUT is atomic on an object store

    def _get(self, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(join(self.path, name))
        except FileNotFoundError:
            return None

    def _get_json(self, name: str) -> dict[str, Any] | None:
        raw = self._get(name)
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    # ---- the run config ----------------------------------------------------------------------

    def write_run_config(self, run_config: dict[str, Any]) -> None:
        self._put(RUN_CONFIG, json.dumps(run_config, indent=1, sort_keys=True).encode())

    def read_run_config(self) -> dict[str, Any]:
        raw = self._get(RUN_CONFIG)
        if raw is None:
            raise FileNotFoundError(f"{self.url}: no {RUN_CONFIG} (the controller writes it first)")
        return json.loads(raw)

    # ---- drain: request and acknowledgement --------------------------------------------------

    def request_drain(self, reason: str) -> None:
        self._put(DRAIN_REQUEST, (reason or "drain requested").encode())

    def drain_request(self) -> str | None:
        """The reason a drain was requested, or None."""
        raw = self._get(DRAIN_REQUEST)
        return None if raw is None else (raw.decode(errors="replace") or "drain requested")

    def acknowledge_drain(self, step: int, reason: str) -> None:
        ack = {"step": step, "reason": reason, "at": time.time()}
        self._put(DRAIN_ACK, json.dumps(ack).encode())

    def drain_ack(self) -> dict[str, Any] | None:
        return self._get_json(DRAIN_ACK)

    # ---- the last save -----------------------------------------------------------------------

    def record_save(self, step: int, seconds: float) -> None:
        """What a drain's save will cost: the lease watch leaves this much room before a lease ends."""
        self._put(
            LAST_SAVE, json.dumps({"step": step, "seconds": seconds, "at": time.time()}).encode()
        )

    def last_save(self) -> dict[str, Any] | None:
        return self._get_json(LAST_SAVE)

    # ---- metrics -----------------------------------------------------------------------------

    def segments(self) -> list[str]:
        """The metrics segments' paths, oldest first."""
        base = join(self.path, METRICS_DIR)
        self.fs.invalidate_cache(base)  # another host may have written since we last looked
        try:
            names = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return []
        found = [n for n in names if n.rsplit("/", 1)[-1].startswith(_SEGMENT_PREFIX)]
        return sorted(n for n in found if n.endswith(".jsonl"))

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every metrics record of the attempt, in order."""
        records: list[dict[str, Any]] = []
        for path in self.segments():
            try:
                records += parse_lines(self.fs.cat_file(path).decode("utf-8", errors="replace"))
            except FileNotFoundError:
                continue
        return records

    def first_metrics(self) -> dict[str, Any] | None:
        """The oldest record, from the oldest segment that has one."""
        for path in self.segments():
            try:
                lines = parse_lines(self.fs.cat_file(path).decode("utf-8", errors="replace"))
            except FileNotFoundError:
                continue
            if lines:
                return lines[0]
        return None

    def last_metrics(self) -> dict[str, Any] | None:
        """The newest record, from the newest segment that has one: cheap on long runs."""
        for path in reversed(self.segments()):
            try:
                lines = parse_lines(self.fs.cat_file(path).decode("utf-8", errors="replace"))
            except FileNotFoundError:
                continue
            if lines:
                return lines[-1]
        return None

    def metrics_writer(self, flush_every_s: float = 2.0) -> MetricsSpool:
        return MetricsSpool(self, flush_every_s)


class MetricsSpool:
    """Rank 0's metrics: appended to a local spool as they happen, flushed to the run dir.

    A flush rewrites the current segment whole, so a reader on any store sees each segment as
    one object; it happens on the first record, whenever flush_every_s has passed, and on
    flush() (every checkpoint) and close(). A new attempt appends after what the run dir holds.
    """

    def __init__(self, run_dir: RunDir, flush_every_s: float = 2.0) -> None:
        self.run_dir = run_dir
        self.flush_every_s = flush_every_s
        existing = run_dir.segments()
        self._index = len(existing)
        self._segment = b""
        self._dirty = False
        self._flushed_at: float | None = None
        spool_dir = tempfile.mkdtemp(prefix="spillway-metrics-")
        self.spool_path = os.path.join(spool_dir, "spool.jsonl")
        self._spool = open(self.spool_path, "ab")  # noqa: SIM115 - held open for the run

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        self._spool.write(line)
        self._spool.flush()
        self._segment += line
        self._dirty = True
        now = time.monotonic()
        if self._flushed_at is None or now - self._flushed_at >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        """Put the current segment in the run dir; start the next once it is big enough."""
        self._flushed_at = time.monotonic()
        if not self._dirty:
            return
        self.run_dir._put(segment_name(self._index), self._segment)
        self._dirty = False
        if len(self._segment) >= SEGMENT_BYTES:
            self._index += 1
            self._segment = b""

    def close(self) -> None:
        self.flush()
        self._spool.close()
        os.remove(self.spool_path)
        os.rmdir(os.path.dirname(self.spool_path))
