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


def is_offset(spec: str) -> bool:
    """spec counts from `fleet up` (+30m) rather than naming an absolute time."""
    return bool(_OFFSET.match(str(spec).strip()))


def lease_window(
    lease_start: str | None, lease_end: str | None, anchor: float
) -> tuple[float | None, float | None]:
    """A lease's (start, end) in epoch seconds. A local cluster's lease that names no start
    starts when the fleet came up (anchor); validate_fleet refuses a missing start elsewhere."""
    end = resolve_time(lease_end, anchor)
    start = resolve_time(lease_start, anchor)
    if start is None and end is not None:
        start = anchor
    return start, end
