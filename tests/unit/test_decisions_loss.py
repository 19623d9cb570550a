"""Loss detection: refused connections lose a cluster in 5 s, hangs in lost_after_s, a blip
never, and nothing is lost while the controller cannot reach home."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.scheduling import ProbeHistory, observe, verdict
from orchestrator.scheduling.loss import describe

T0 = 1_000.0
LOST_AFTER_S = 10.0


def run(results: list[tuple[float, str]], home: bool = True) -> ProbeHistory:
    h = ProbeHistory()
    for at, result in results:
        h = observe(h, result, at, home_reachable=home)
    return h


def every_second(result: str, seconds: int, start: float = T0) -> list[tuple[float, str]]:
    return [(start + s, result) for s in range(seconds + 1)]


def test_refused_for_five_seconds_is_lost():
    h = run(every_second("refused", 4))
    assert verdict(h, T0 + 4, LOST_AFTER_S) == "suspect"
    h = observe(h, "refused", T0 + 5)
    assert verdict(h, T0 + 5, LOST_AFTER_S) == "lost"


def test_timeouts_and_errors_are_lost_only_after_lost_after_s():
    for kind in ("timeout", "error"):
        h = run(every_second(kind, 9))
        assert verdict(h, T0 + 9, LOST_AFTER_S) == "suspect", kind
        assert verdict(observe(h, kind, T0 + 10), T0 + 10, LOST_AFTER_S) == "lost", kind


def test_a_three_second_blip_then_ok_is_up_again():
    for kind in ("refused", "timeout", "error"):
        h = run(every_second(kind, 3))
        assert verdict(h, T0 + 3, LOST_AFTER_S) == "suspect"
        h = observe(h, "ok", T0 + 4)
        assert verdict(h, T0 + 4, LOST_AFTER_S) == "up"
        # The blip is forgotten: a new streak starts from zero.
        h = observe(observe(h, kind, T0 + 5), kind, T0 + 9)
        assert verdict(h, T0 + 9, LOST_AFTER_S) == "suspect"


def test_a_timeout_breaks_a_run_of_refused_but_not_the_failure_streak():
    probes = [*every_second("refused", 3), (T0 + 4, "timeout"), *every_second("refused", 4, T0 + 5)]
    h = run(probes)  # refused from T0+5 to T0+9: 4 s; failing since T0: 9 s
    assert verdict(h, T0 + 9, LOST_AFTER_S) == "suspect"
    assert verdict(observe(h, "refused", T0 + 10), T0 + 10, LOST_AFTER_S) == "lost"


def test_the_verdict_ages_between_probes():
    # A probe that itself hangs leaves no new result; the streak still counts to `now`.
    h = run([(T0, "timeout")])
    assert verdict(h, T0 + 9.9, LOST_AFTER_S) == "suspect"
    assert verdict(h, T0 + 10, LOST_AFTER_S) == "lost"


def test_never_lost_while_home_is_unreachable_and_those_failures_are_not_held_against_it():
    h = run(every_second("refused", 30))
    assert verdict(h, T0 + 30, LOST_AFTER_S, home_reachable=False) == "suspect"
    # Failures seen while home itself was unreachable do not count once it answers again.
    h = run(every_second("timeout", 30), home=False)
    assert verdict(h, T0 + 30, LOST_AFTER_S) == "suspect"
    h = observe(h, "timeout", T0 + 31)
    assert verdict(h, T0 + 40, LOST_AFTER_S) == "suspect"
    assert verdict(h, T0 + 41, LOST_AFTER_S) == "lost"


def test_a_cluster_never_probed_or_answering_is_up():
    assert verdict(ProbeHistory(), T0, LOST_AFTER_S) == "up"
    assert verdict(run([(T0, "ok")]), T0 + 999, LOST_AFTER_S) == "up"


def test_an_unknown_probe_result_is_refused():
    with pytest.raises(ValueError, match="probe result must be one of ok, refused"):
        observe(ProbeHistory(), "maybe", T0)


def test_describe_says_how_and_for_how_long():
    assert describe(run(every_second("refused", 5)), T0 + 5) == (
        "refusing connections for 5s (6 failed probe(s))"
    )
    assert describe(run(every_second("timeout", 2)), T0 + 2).startswith("not answering")
    assert describe(run([(T0, "ok")]), T0) == "answering"


# ---- properties ----------------------------------------------------------------------------

PROPERTY = settings(max_examples=200, deadline=None)
REFUSED_LIMIT = 5.0
EPS = 1e-6

_intervals = st.lists(st.floats(0.05, 2.0), min_size=1, max_size=200)


@PROPERTY
@given(
    st.floats(5.0, 30.0),
    st.lists(
        st.lists(st.sampled_from(["refused", "timeout", "error"]), min_size=1, max_size=60),
        min_size=1,
        max_size=4,
    ),
    _intervals,
)
def test_a_failure_streak_shorter_than_its_limit_then_ok_is_never_lost(
    lost_after_s, streaks, intervals
):
    h, t, probes = ProbeHistory(), T0, 0
    for streak in streaks:
        start, refused_from = None, None
        for kind in streak:
            if start is not None and t - start >= lost_after_s - EPS:
                break  # the streak is kept shorter than lost_after_s
            if kind == "refused" and refused_from is not None and t - refused_from >= 5 - EPS:
                kind = "timeout"  # and each run of refused shorter than 5 s
            start = t if start is None else start
            refused_from = (
                (refused_from if refused_from is not None else t) if kind == "refused" else None
            )
            h = observe(h, kind, t)
            assert verdict(h, t, lost_after_s) != "lost", (kind, t - start)
            t += intervals[probes % len(intervals)]
            probes += 1
        h = observe(h, "ok", t)
        assert verdict(h, t, lost_after_s) == "up"
        t += intervals[probes % len(intervals)]
        probes += 1


@PROPERTY
@given(st.floats(5.0, 60.0), _intervals, st.floats(0.0, 1e6))
def test_refused_for_longer_than_five_seconds_is_lost_by_five_seconds_and_one_interval(
    lost_after_s, intervals, start
):
    h, t, i = ProbeHistory(), start, 0
    while True:
        h = observe(h, "refused", t)
        if verdict(h, t, lost_after_s) == "lost":
            break
        t += intervals[i % len(intervals)]
        i += 1
    assert t - start >= REFUSED_LIMIT, "lost before the limit"
    assert t - start <= REFUSED_LIMIT + max(intervals) + EPS, "lost later than one probe after"


@PROPERTY
@given(st.floats(5.0, 60.0), _intervals, st.sampled_from(["timeout", "error"]))
def test_a_hang_is_lost_by_lost_after_s_and_one_interval_and_not_before(
    lost_after_s, intervals, kind
):
    h, t, i = ProbeHistory(), T0, 0
    while True:
        h = observe(h, kind, t)
        if verdict(h, t, lost_after_s) == "lost":
            break
        t += intervals[i % len(intervals)]
        i += 1
    assert lost_after_s <= t - T0 <= lost_after_s + max(intervals) + EPS


@PROPERTY
@given(
    st.lists(
        st.tuples(st.sampled_from(["ok", "refused", "timeout", "error"]), st.floats(0.05, 30.0)),
        max_size=50,
    )
)
def test_nothing_is_lost_while_home_is_unreachable(probes):
    h, t = ProbeHistory(), T0
    for kind, gap in probes:
        t += gap
        h = observe(h, kind, t, home_reachable=False)
        assert verdict(h, t + 1e6, 1.0, home_reachable=False) != "lost"
        assert verdict(h, t, 1.0) != "lost"  # the failures seen meanwhile do not count either
