"""How long a job that could not start waits before the next try: exponential, capped, pure.

The controller counts, per job, the attempts in a row that could not start (NO_CAPACITY, a
failed submit), sets `JobRequest.not_before` from `retry_at`, and resets the count once an
attempt runs. Without it a cluster that refuses every submit would be hammered every tick.
"""

from __future__ import annotations

import hashlib
import math

# Past this many doublings every cap anyone would set is reached; stops 2**n overflowing.
_MAX_DOUBLINGS = 60


def backoff_s(
    failures: int, base_s: float = 5.0, cap_s: float = 300.0, seed: str | None = None
) -> float:
    """Seconds to wait after `failures` failed starts in a row: 0 for none, then base_s,
    2 * base_s, 4 * base_s, ... up to cap_s.

    With a `seed` (say the job id) the wait is scaled into [half, all] of that by a fraction
    drawn from the seed and the count, so many jobs failing together do not all retry on the
    same tick, and the same job and count always get the same wait.
    """
    if failures < 0:
        raise ValueError(f"failures must be >= 0, got {failures}")
    if not (base_s > 0 and math.isfinite(base_s)):
        raise ValueError(f"base_s must be a positive number of seconds, got {base_s}")
    if not cap_s >= base_s:
        raise ValueError(f"cap_s must be at least base_s ({base_s}), got {cap_s}")
    if failures == 0:
        return 0.0
    wait = min(cap_s, base_s * 2.0 ** min(failures - 1, _MAX_DOUBLINGS))
    if seed is None:
        return wait
    return wait * (0.5 + 0.5 * _fraction(f"{seed}:{failures}"))


def retry_at(
    failed_at: float,
    failures: int,
    base_s: float = 5.0,
    cap_s: float = 300.0,
    seed: str | None = None,
) -> float:
    """The `not_before` for a job whose `failures`-th failed start in a row was at `failed_at`."""
    return failed_at + backoff_s(failures, base_s, cap_s, seed)


def _fraction(key: str) -> float:
    # hashlib, not hash(): Python salts str hashes per process, and a restarted controller
    # must compute the same wait.
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
