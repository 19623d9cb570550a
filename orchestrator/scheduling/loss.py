"""Is a cluster lost? A pure reading of its probe history, with no false alarm for a blip.

The controller probes each cluster each tick and folds the result in with `observe`; `verdict`
then says "up", "suspect" or "lost". A probe ends:
  - "ok": it answered;
  - "refused": nothing listens where its head was; the head is gone, so a short limit
    (`refused_lost_after_s`, 5 s) is enough;
  - "timeout": it accepted and did not answer (a hung or partitioned head, which may come
    back), so the fleet's `lost_after_s`;
  - "error": it answered wrongly; as a timeout.
An unbroken run of refused probes counts against the short limit; a streak of failures of any
kind counts against `lost_after_s`; one ok probe ends both. A failure observed while the
controller cannot reach home itself is not held against the cluster (the partition may be the
controller's own): the streaks start again with the first failure seen while home answers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

OK = "ok"
REFUSED = "refused"
TIMEOUT = "timeout"
ERROR = "error"
RESULTS = (OK, REFUSED, TIMEOUT, ERROR)

UP = "up"
SUSPECT = "suspect"
LOST = "lost"
Verdict = Literal["up", "suspect", "lost"]


@dataclass(frozen=True)
class ProbeHistory:
    last_result: str | None = None  # None before the first probe
    last_probe_at: float | None = None
    last_ok_at: float | None = None
    # First failure of the current streak that counts against the cluster; None: no streak.
    failing_since: float | None = None
    # First probe of the current unbroken run of refused ones that counts; None: no such run.
    refused_since: float | None = None
    failures: int = 0  # failed probes in a row, counted or not (for the log)


def observe(
    history: ProbeHistory, result: str, now: float, home_reachable: bool = True
) -> ProbeHistory:
    """The history after one more probe, ending `result` at `now`."""
    if result not in RESULTS:
        raise ValueError(f"probe result must be one of {', '.join(RESULTS)}, got {result!r}")
    if result == OK:
        return ProbeHistory(last_result=OK, last_probe_at=now, last_ok_at=now)
    seen = replace(history, last_result=result, last_probe_at=now, failures=history.failures + 1)
    if not home_reachable:
        return replace(seen, failing_since=None, refused_since=None)
    failing_since = history.failing_since if history.failing_since is not None else now
    refused_since = None
    if result == REFUSED:
        refused_since = history.refused_since if history.refused_since is not None else now
    return replace(seen, failing_since=failing_since, refused_since=refused_since)


def verdict(
    history: ProbeHistory,
    now: float,
    lost_after_s: float,
    refused_lost_after_s: float = 5.0,
    home_reachable: bool = True,
) -> Verdict:
    """ "lost" once refused probes have run `refused_lost_after_s` or failures `lost_after_s`,
    both measured to `now`; "suspect" while the last probe failed short of that (or while home
    itself is unreachable: the controller cannot tell its partition from the cluster's);
    "up" otherwise."""
    if history.last_result in (None, OK):
        return UP
    if not home_reachable:
        return SUSPECT
    if history.refused_since is not None and now - history.refused_since >= refused_lost_after_s:
        return LOST
    if history.failing_since is not None and now - history.failing_since >= lost_after_s:
        return LOST
    return SUSPECT


def describe(history: ProbeHistory, now: float) -> str:
    """One line for the log and the attempt's exit reason when its cluster is declared lost."""
    if history.last_result in (None, OK):
        return "answering"
    since = history.refused_since if history.refused_since is not None else history.failing_since
    how = _HOW[history.last_result]
    if since is None:
        return f"{how} ({history.failures} probe(s), not counted while home was unreachable)"
    return f"{how} for {now - since:.0f}s ({history.failures} failed probe(s))"


_HOW = {
    REFUSED: "refusing connections",
    TIMEOUT: "not answering (timeouts)",
    ERROR: "answering with errors",
}


def known(history: ProbeHistory | None, verdict_now: Verdict) -> bool:
    """Whether the controller knows a cluster well enough to place jobs past it: its last
    probe answered, or it has been declared lost. A cluster whose probes fail short of lost
    is neither up nor down yet (a head still starting, a probe timed out under load, even
    right after a first answer): placing then would send jobs that prefer it elsewhere for
    good."""
    if history is None:
        return False
    return verdict_now in (UP, LOST)
