"""What every command shares: the one-line refusal of bad input."""

from __future__ import annotations

import sys

from orchestrator.config import ConfigError


def bad_config(exc: ConfigError) -> int:
    print(f"spillway: bad config: {exc}", file=sys.stderr)
    return 2


class Refused(Exception):
    """A request the command turns down: one line to the user, exit status 2."""


def refuse(message: str) -> int:
    print(f"spillway: {message}", file=sys.stderr)
    return 2
