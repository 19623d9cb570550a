"""Lease windows: absolute ISO-8601 times, or offsets from `fleet up` such as +30m."""

from __future__ import annotations

import re
from datetime import datetime, timezone

_OFFSET = re.compile(r"^\+(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def resolve_time(spec: str | None, anchor: float) -> float | None:
    """Epoch seconds for spec; offsets count from anchor (the moment the fleet came up)."""
    if spec is None:
        return None
    text = str(spec).strip()
    offset = _OFFSET.match(text)
    if offset:
        return anchor + float(offset.group(1)) * _UNIT_S[offset.group(2)]
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"'{text}' is neither an offset like +30m (units s, m, h, d) nor an ISO-8601 time"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()
