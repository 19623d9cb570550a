"""Whose fault a rank's exception was: the user's (no retry), the run config's, or the
infrastructure's (retried from the last committed checkpoint).

Pure functions of the exception object: its type, its cause chain and the frames of its
traceback. Nothing is imported to decide: classes are matched by their qualified names, so a
cluster without botocore, or a driver that never imports torch, classifies the same way.

The rules, first match wins:

1. A ConfigError anywhere in the cause chain is BAD_CONFIG; so is SystemExit(2), the code the
   recipe exits with on a bad config. Any other SystemExit is the user's (a recipe that stops
   itself with a message); any other BaseException (KeyboardInterrupt...) came from outside:
   infrastructure.
2. Infrastructure by type, anywhere in the cause chain: torch.distributed's DistError (and
   DistBackendError, DistNetworkError, DistStoreError), TimeoutError, ConnectionError,
   botocore's own errors (BotoCoreError: endpoint unreachable, connect/read timeouts,
   credentials the cluster lacks), aiohttp's and requests' connection errors; a RuntimeError
   whose message is a collective's (gloo says "Connection reset by peer" when its peer died and
   "[.../gloo/...] Timed out waiting" when it hangs); an OSError whose errno says the system
   failed (EIO, ENOSPC, EROFS, ESTALE, EBUSY as s3fs says SlowDown, network errnos...): a disk
   or a network failing under the user's code is not the user's bug.
3. Otherwise the innermost frame that belongs to someone decides. Infrastructure code is
   Spillway's checkpoint and run-dir code, torch.distributed (its collectives and DCP, but not
   FSDP's and DTensor's own argument checks, which are the model's), and the storage libraries
   (fsspec, s3fs, gcsfs, adlfs, aiobotocore, botocore). User code is recipes/ and anything that
   is neither the standard library, an installed third-party package nor the rest of Spillway
   (those are skipped: they run on someone's behalf). For an OSError that names a request gone
   wrong rather than a system gone wrong (not found, permission denied, exists, invalid), the
   storage libraries are skipped too: whoever named the path decides. So a data path the user
   got wrong is the user's even when fsspec raised it, and a checkpoint directory that vanished
   is the infrastructure's even when it was a FileNotFoundError.
4. A frame of infrastructure code decides INFRASTRUCTURE; a user frame USER_ERROR. With no
   deciding frame at all (an exception that lost its traceback on the way, or one raised in
   library code only) an OSError is INFRASTRUCTURE, since nothing shows that the user named
   its path, and anything else USER_ERROR.
"""

from __future__ import annotations

import errno
import re
import sys
import traceback
from collections.abc import Iterator
from types import TracebackType

from orchestrator import exit_codes

KINDS = {
    exit_codes.USER_ERROR: "user",
    exit_codes.BAD_CONFIG: "config",
    exit_codes.INFRASTRUCTURE: "infrastructure",
}

CONFIG_ERRORS = frozenset({"orchestrator.config.errors.ConfigError"})
INFRASTRUCTURE_ERRORS = frozenset(
    {
        "torch.distributed.DistError",
        "builtins.TimeoutError",
        "builtins.ConnectionError",
        "botocore.exceptions.BotoCoreError",
        "aiohttp.client_exceptions.ClientConnectionError",
        "aiohttp.client_exceptions.ServerTimeoutError",
        "requests.exceptions.ConnectionError",
        "requests.exceptions.Timeout",
    }
)
# The collective broke under this rank: what every other rank sees when one leaves it.
PEER_ERRORS = frozenset({"torch.distributed.DistError"})
COLLECTIVE_MESSAGE = re.compile(
    r"by peer|connection (?:reset|closed|refused|lost)|broken pipe|/gloo/|\bgloo\b|\bnccl\b"
    r"|ProcessGroup|\bc10d\b|collective operation timeout|timed out waiting",
    re.IGNORECASE,
)
SYSTEM_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EIO EREMOTEIO EBUSY ENOSPC EDQUOT EROFS ESTALE ENOLINK ECOMM ENETDOWN ENETUNREACH "
        "ENETRESET EHOSTDOWN EHOSTUNREACH ECONNABORTED ECONNRESET ECONNREFUSED ETIMEDOUT EPIPE"
    ).split()
    if hasattr(errno, name)
)

INFRASTRUCTURE_MODULES = ("orchestrator.checkpoint", "orchestrator.rundir", "torch.distributed")
# torch.distributed code that checks the model it is given: its errors are the model's.
SHARDING_MODULES = (
    "torch.distributed.fsdp",
    "torch.distributed.tensor",
    "torch.distributed._tensor",
    "torch.distributed._composable",
    "torch.distributed.pipelining",
)
STORAGE_LIBRARIES = frozenset({"fsspec", "s3fs", "gcsfs", "adlfs", "aiobotocore", "botocore"})
USER_MODULES = ("recipes",)

INFRASTRUCTURE, STORAGE, USER, NEUTRAL = "infrastructure", "storage", "user", "neutral"
TRACEBACK_LINES = 30
MESSAGE_CHARS = 300


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def zone(module: str, filename: str) -> str:
    """Whose code a frame runs: INFRASTRUCTURE, STORAGE (a storage library), USER, or NEUTRAL
    (the standard library, a third-party package, the rest of Spillway)."""
    if _under(module, INFRASTRUCTURE_MODULES):
        return NEUTRAL if _under(module, SHARDING_MODULES) else INFRASTRUCTURE
    top = module.partition(".")[0]
    if top in STORAGE_LIBRARIES:
        return STORAGE
    if _under(module, USER_MODULES):
        return USER  # before the site-packages test: a wheel install puts recipes/ there
    if top == "orchestrator" or top in sys.stdlib_module_names:
        return NEUTRAL
    if "site-packages" in filename or "dist-packages" in filename or filename.startswith("<frozen"):
        return NEUTRAL
    return USER


def chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and what it was raised from or while handling, as a traceback shows them."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )


def _names(exc: BaseException) -> set[str]:
    return {f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__}


def _frames(tb: TracebackType | None) -> list[tuple[str, str, int]]:
    """(module, file, line) of each frame, innermost first."""
    frames = []
    while tb is not None:
        code = tb.tb_frame.f_code
        frames.append((tb.tb_frame.f_globals.get("__name__", ""), code.co_filename, tb.tb_lineno))
        tb = tb.tb_next
    return frames[::-1]


def _system_oserror(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in SYSTEM_ERRNOS


def _collective(exc: BaseException) -> bool:
    names = _names(exc)
    if names & PEER_ERRORS:
        return True
    return isinstance(exc, RuntimeError) and bool(COLLECTIVE_MESSAGE.search(str(exc)))


def is_peer_failure(exc: BaseException) -> bool:
    """Whether a collective broke under this rank (a peer closed, was lost, or timed out):
    what the other ranks see when one rank fails, so it says little about the first failure."""
    return any(_collective(e) for e in chain(exc))


def deciding_frame(exc: BaseException) -> tuple[str, str, int] | None:
    """(zone, module, line) of the innermost frame that decides whose fault `exc` was."""
    skip_storage = isinstance(exc, OSError) and not _system_oserror(exc)
    for module, filename, line in _frames(exc.__traceback__):
        where = zone(module, filename)
        if where == NEUTRAL or (where == STORAGE and skip_storage):
            continue
        return where, module, line
    return None


def failure_code(exc: BaseException) -> int:
    """BAD_CONFIG, INFRASTRUCTURE or USER_ERROR for an exception a rank raised."""
    links = list(chain(exc))
    if any(_names(e) & CONFIG_ERRORS for e in links):
        return exit_codes.BAD_CONFIG
    if isinstance(exc, SystemExit):
        return exit_codes.BAD_CONFIG if exc.code == exit_codes.BAD_CONFIG else exit_codes.USER_ERROR
    if not isinstance(exc, Exception):
        return exit_codes.INFRASTRUCTURE
    for e in links:
        if _names(e) & INFRASTRUCTURE_ERRORS or _collective(e) or _system_oserror(e):
            return exit_codes.INFRASTRUCTURE
    decided = deciding_frame(exc)
    if decided is None:
        return exit_codes.INFRASTRUCTURE if isinstance(exc, OSError) else exit_codes.USER_ERROR
    return exit_codes.USER_ERROR if decided[0] == USER else exit_codes.INFRASTRUCTURE


def describe(exc: BaseException) -> str:
    """One line: the exception's type and first line, and the frame that decided whose it was."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    if len(line) > MESSAGE_CHARS:
        line = line[: MESSAGE_CHARS - 3] + "..."
    decided = deciding_frame(exc)
    return line if decided is None else f"{line} (at {decided[1]}:{decided[2]})"


def traceback_tail(exc: BaseException, lines: int = TRACEBACK_LINES) -> str:
    """The last `lines` lines of the formatted traceback, the innermost frames among them."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return "\n".join(text.rstrip().splitlines()[-lines:])


def failure_report(exc: BaseException) -> dict:
    """What a rank returns in place of its result when the recipe raised: plain values, so the
    driver reads it without importing the recipe (or torch)."""
    code = failure_code(exc)
    return {
        "code": code,
        "kind": KINDS[code],
        "message": describe(exc),
        "traceback": traceback_tail(exc),
        "peer": is_peer_failure(exc),
    }
