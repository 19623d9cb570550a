"""Back-off after failed starts, and the budget checked on every tick."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.scheduling import (
    attempt_cost,
    backoff_s,
    budget_cause,
    drain_cost,
    over_budget,
    retry_at,
)

# ---- back-off ----------------------------------------------------------------------------


def test_backoff_doubles_from_the_base_and_stops_at_the_cap():
    assert [backoff_s(n) for n in range(8)] == [0.0, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0]
    assert backoff_s(10_000) == 300.0  # no overflow for a count nobody expected
    assert backoff_s(3, base_s=1.0, cap_s=3.0) == 3.0


def test_retry_at_adds_the_wait_to_the_failure_time():
    assert retry_at(1000.0, 0) == 1000.0
    assert retry_at(1000.0, 2, base_s=2.0) == 1004.0


def test_seeded_jitter_is_deterministic_and_spreads_jobs_within_half_to_all_of_the_wait():
    waits = [backoff_s(4, seed=f"job-{i}") for i in range(50)]
    assert waits == [backoff_s(4, seed=f"job-{i}") for i in range(50)]
    assert all(20.0 <= w <= 40.0 for w in waits)
    assert len(set(waits)) > 40  # not all on the same tick
    assert backoff_s(0, seed="job-1") == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"failures": -1}, "failures"),
        ({"failures": 1, "base_s": 0.0}, "base_s"),
        ({"failures": 1, "base_s": float("nan")}, "base_s"),
        ({"failures": 1, "base_s": 10.0, "cap_s": 5.0}, "cap_s"),
    ],
)
def test_backoff_refuses_nonsense(kwargs, match):
    with pytest.raises(ValueError, match=match):
        backoff_s(**kwargs)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 80),
    st.floats(0.01, 100.0),
    st.floats(0.0, 1000.0),
    st.one_of(st.none(), st.text(max_size=8)),
)
def test_backoff_never_shrinks_with_more_failures_and_never_passes_the_cap(n, base, extra, seed):
    cap = base + extra
    now, more = backoff_s(n, base, cap), backoff_s(n + 1, base, cap)
    assert 0.0 <= now <= cap and more <= cap
    if seed is None:
        assert more >= now
    else:  # jittered: within [half, all] of the unjittered wait
        plain = backoff_s(n, base, cap)
        assert plain / 2 <= backoff_s(n, base, cap, seed) <= plain


# ---- budget --------------------------------------------------------------------------------


def test_costs_of_a_running_attempt_and_of_its_final_save():
    # 2 devices at 3.0 per device-hour for half an hour, and a 36 s save.
    assert attempt_cost(0.0, 1800.0, 2, 3.0) == pytest.approx(3.0)
    assert drain_cost(36.0, 2, 3.0) == pytest.approx(0.06)
    assert attempt_cost(100.0, 50.0, 2, 3.0) == 0.0  # a clock reading before the start


def test_drain_when_spent_plus_the_save_reaches_the_budget_not_after():
    assert not over_budget(cost_so_far=4.0, running_cost=5.0, budget=10.0, drain_cost=0.5)
    assert over_budget(cost_so_far=4.0, running_cost=5.5, budget=10.0, drain_cost=0.5)
    # Reached by the save alone: the run itself is still under.
    assert over_budget(cost_so_far=4.0, running_cost=5.2, budget=10.0, drain_cost=1.0)


def test_no_budget_or_nothing_being_spent_never_drains():
    assert not over_budget(1e9, 1e9, None, 1e9)
    # Already at the budget, but on free capacity: draining would only strand it in the queue.
    assert not over_budget(cost_so_far=10.0, running_cost=0.0, budget=10.0, drain_cost=0.0)


def test_budget_cause_names_every_part():
    cause = budget_cause(4.0, 5.5, 10.0, 0.5)
    assert cause == (
        "budget 10.00 reached: 4.00 spent before this attempt, 5.50 by it, "
        "0.50 for its final save; draining"
    )


TICK_S = 60.0  # coarse, so that a run to the budget takes at most a few thousand ticks


@settings(max_examples=200, deadline=None)
@given(
    st.floats(0.0, 50.0),
    st.floats(1.0, 20.0),
    st.integers(1, 8),
    st.floats(0.0, 120.0),
    st.floats(0.0, 50.0),
)
def test_checked_every_tick_the_drain_starts_before_the_save_would_overspend(
    budget, rate, devices, save_s, spent_before
):
    """At the first tick where over_budget says drain, what the job has spent plus its save
    has reached the budget, one tick earlier it had not, and the overshoot is one tick's."""
    save = drain_cost(save_s, devices, rate)
    running = [attempt_cost(0.0, t * TICK_S, devices, rate) for t in range(4000)]
    if spent_before + save >= budget:
        assert over_budget(spent_before, running[1], budget, save)
        return
    tick = next(
        t for t, cost in enumerate(running) if over_budget(spent_before, cost, budget, save)
    )
    assert spent_before + running[tick - 1] + save < budget <= spent_before + running[tick] + save
    assert spent_before + running[tick] + save - budget <= running[1] + 1e-9
