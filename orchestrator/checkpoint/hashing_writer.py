"""A DCP writer that hashes each file's bytes as it writes them, so no rank re-reads its shards.

torch.distributed.checkpoint's FsspecWriter opens every file it writes (the shard files and, on
the coordinator, ``.metadata.tmp``, renamed to ``.metadata``) through one method,
``FileSystem.create_stream(path, "wb")``, and writes them front to back through the stream it
gets: ``write`` and ``tell`` (torch's ``_write_item`` records offsets with ``tell``), ``fileno``
for the fsync, ``close``. So the stream is wrapped: every ``write`` feeds the hasher before the
bytes go on, and once the file closed cleanly (for an object store: once it is uploaded), its
size and hash are recorded. A stream that is asked to seek refuses (io.UnsupportedOperation), so
a torch that ever wrote a file out of order would fail the save loudly rather than record a wrong
hash; a file the writer did not write front to back in one go (another mode) is not recorded,
and the caller hashes it by reading it back.

Hashes live in the writer object: a save that runs the writer in another process (DCP's process
mode) records nothing here, and the caller falls back to reading its files back.
"""

from __future__ import annotations

import io
import os
import posixpath
import threading
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecWriter

from orchestrator.checkpoint import hashing
from orchestrator.checkpoint.manifest import FileEntry


class _HashingStream:
    """A write-only stream that hashes what passes through it, in order."""

    def __init__(self, raw: Any, algorithm: str) -> None:
        self._raw = raw
        self._hasher = hashing.new_hasher(algorithm)
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")  # torch passes bytes, memoryviews and tensor buffers
        self._hasher.update(view)
        written = self._raw.write(view)
        if written is not None and written != len(view):
            # A short write would leave the file and the hash apart; fsspec files never do one.
            raise OSError(f"short write: {written} of {len(view)} bytes")
        self.size += len(view)
        return len(view)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def tell(self) -> int:
        return self.size

    def seekable(self) -> bool:
        return False

    def seek(self, *_: Any) -> int:
        raise io.UnsupportedOperation("a hashed checkpoint stream is written front to back")

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._raw.fileno()  # AttributeError/UnsupportedOperation: torch falls back

    def flush(self) -> None:
        self._raw.flush()

    def close(self) -> None:
        self._raw.close()

    @property
    def closed(self) -> bool:
        return self._raw.closed

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()


class _HashingFileSystem(FileSystem):
    """torch's fsspec FileSystem, recording (size, hash) of every file written in one go."""

    def __init__(self, fs: Any, algorithm: str) -> None:
        super().__init__()
        self.fs = fs
        self.algorithm = algorithm
        self._lock = threading.Lock()  # DCP may write files from several threads
        self.hashed: dict[str, tuple[int, str]] = {}  # path as torch names it -> (size, hex)

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[Any, None, None]:
        path = os.fspath(path)
        with self._lock:
            self.hashed.pop(path, None)  # rewritten: whatever was recorded is stale
        with super().create_stream(path, mode) as raw:
            if mode != "wb":
                yield raw
                return
            stream = _HashingStream(raw, self.algorithm)
            yield stream
        # Only here has the file closed without error (and, on an object store, been uploaded).
        with self._lock:
            self.hashed[path] = (stream.size, stream.hexdigest())

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)
        with self._lock:
            self.hashed.pop(os.fspath(new_path), None)
            moved = self.hashed.pop(os.fspath(path), None)
            if moved is not None:
                self.hashed[os.fspath(new_path)] = moved

    def rm_file(self, path: str | os.PathLike) -> None:
        with self._lock:
            self.hashed.pop(os.fspath(path), None)
        super().rm_file(path)


class HashingFsspecWriter(FsspecWriter):
    """FsspecWriter that hashes with ``algorithm`` what it writes; ``entries()`` afterwards."""

    def __init__(
        self, path: str, *, algorithm: str = hashing.DEFAULT, **storage_options: Any
    ) -> None:
        super().__init__(path, **storage_options)
        self.fs = _HashingFileSystem(self.fs.fs, hashing.check_algorithm(algorithm))

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        super().reset(checkpoint_id)
        self.fs.hashed.clear()  # a new save: nothing of an earlier one is this one's

    def entries(self) -> dict[str, FileEntry]:
        """Each file written directly under the checkpoint dir, by its name there."""
        base = os.fspath(self.path).rstrip("/") + "/"
        out = {}
        with self.fs._lock:
            hashed = dict(self.fs.hashed)
        for path, (size, hexdigest) in hashed.items():
            rel = path[len(base) :] if path.startswith(base) else None
            if rel and posixpath.basename(rel) == rel:
                out[rel] = FileEntry(rel, size, hexdigest, self.fs.algorithm)
        return out
