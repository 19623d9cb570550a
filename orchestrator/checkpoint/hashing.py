"""Content hashes of checkpoints: the algorithms, and how a recorded digest is spelled.

New checkpoints use BLAKE3: a cryptographic hash that runs several GB/s on one core and spreads
one large update over a thread pool of its own, so verifying a checkpoint keeps up with the disk
(sha256 on one core, about 1.35 GB/s here, did not). sha256 stays readable: manifests of
version 1 and digests the controller recorded before they named their algorithm use it.

A digest as recorded is ``"<algorithm>:<hex>"`` (``"blake3:9f2c..."``); a bare 64-digit hex is
the sha256 recorded by earlier versions. Nothing here imports torch: the controller uses it.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Protocol

import blake3

SHA256 = "sha256"
BLAKE3 = "blake3"
ALGORITHMS: tuple[str, ...] = (SHA256, BLAKE3)
DEFAULT = BLAKE3

_HEX = re.compile(r"[0-9a-f]{64}")  # both give 32-byte digests


class Hasher(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


def check_algorithm(algorithm: str) -> str:
    """``algorithm`` if this version can compute it; ValueError otherwise."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown hash algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)})")
    return algorithm


def spare_threads() -> int:
    """Hash threads for a hash that runs beside one busy I/O thread: every core but that one.
    Measured on 2 cores: a copy with 1 hash thread ran ~15% faster than with one per core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def new_hasher(algorithm: str, threads: int | None = None) -> Hasher:
    """A fresh incremental hasher. BLAKE3's spreads each update over ``threads`` threads (None:
    one per core; measured: no cost on small updates), and both release the GIL while they
    hash, so a copy or a writer can do its I/O meanwhile."""
    if check_algorithm(algorithm) == BLAKE3:
        return blake3.blake3(max_threads=blake3.blake3.AUTO if threads is None else threads)
    return hashlib.sha256()


def hex_of(algorithm: str, data: bytes) -> str:
    hasher = new_hasher(algorithm)
    hasher.update(data)
    return hasher.hexdigest()


def is_hex_digest(value: object) -> bool:
    """Whether ``value`` is a hex digest as both algorithms write it (64 lowercase digits)."""
    return isinstance(value, str) and _HEX.fullmatch(value) is not None


def format_digest(algorithm: str, hexdigest: str) -> str:
    return f"{check_algorithm(algorithm)}:{hexdigest}"


def parse_digest(digest: str) -> tuple[str, str]:
    """(algorithm, hex) of a recorded digest: ``"blake3:<hex>"``, ``"sha256:<hex>"``, or a bare
    hex (sha256, as recorded before digests named their algorithm). ValueError if malformed."""
    algorithm, sep, hexdigest = digest.partition(":")
    if not sep:
        algorithm, hexdigest = SHA256, digest
    check_algorithm(algorithm)
    hexdigest = hexdigest.lower()
    if not is_hex_digest(hexdigest):
        raise ValueError(f"malformed {algorithm} digest {digest!r}")
    return algorithm, hexdigest
