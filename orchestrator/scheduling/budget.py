"""A running job's budget, checked every tick: drain at the budget, not after. Pure.

Placement only admits a job whose projected cost fits; a run that goes on longer than
projected (or whose remaining time was unknown) must still stop before it overspends, and its
drain's save costs money too, so the drain starts when what it has spent plus that save
reaches the budget.
"""

from __future__ import annotations


def attempt_cost(
    started_at: float, now: float, world_size: int, cost_per_device_hour: float
) -> float:
    """What an attempt running since `started_at` has cost by `now`."""
    return max(0.0, now - started_at) / 3600 * world_size * cost_per_device_hour


def drain_cost(save_s: float, world_size: int, cost_per_device_hour: float) -> float:
    """What the drain's save will still cost: its duration (the last save's, measured) on the
    devices the attempt holds."""
    return max(0.0, save_s) / 3600 * world_size * cost_per_device_hour


def over_budget(
    cost_so_far: float, running_cost: float, budget: float | None, drain_cost: float
) -> bool:
    """Whether to drain now: what the job spent before this attempt, plus what this attempt has
    spent, plus what its drain will cost, reaches `budget`.

    An attempt that spends nothing (an owned cluster at rate 0) is never drained: it cannot
    overspend, and once what it spent before reached the budget, placement would refuse it
    everywhere, stranding it in the queue.
    """
    if budget is None or running_cost + drain_cost <= 0:
        return False
    return cost_so_far + running_cost + drain_cost >= budget


def budget_cause(cost_so_far: float, running_cost: float, budget: float, drain_cost: float) -> str:
    """The drain's cause, for the job's event log."""
    return (
        f"budget {budget:.2f} reached: {cost_so_far:.2f} spent before this attempt, "
        f"{running_cost:.2f} by it, {drain_cost:.2f} for its final save; draining"
    )
