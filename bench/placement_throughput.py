"""Decisions per second of the placement policy on a large seeded queue and fleet.

    python bench/placement_throughput.py                    # 10,000 jobs, 100 clusters
    python bench/placement_throughput.py --jobs 1000 --repeats 9

The fleet is 60 owned and 40 leased clusters of 8 devices with 1 to 8 free, two device types,
some unreachable, leases at every stage (not started, ending soon, days left, over). The
queue mixes world-size sets, priorities, budgets, spill and min-lease settings, device-type
preferences, and a few explicit cluster lists.

The baseline, timed in the same run and interleaved with `place`, is the least any policy
must do: `queue_order` plus one pass over jobs x clusters evaluating only the candidate
filter (reachable, accepted device type, inside the lease window) and nothing else: no
capacity, cost, budget or lease-time check, no decision objects, no reasons. The ratio
place/baseline is what the real rules cost on top of merely looking at every pair.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence

from common import median  # bench/common.py (this directory is on sys.path; the repo too)
from machine import CpuWatch, describe

from orchestrator.scheduling import (
    LEASED,
    OWNED,
    ClusterSnapshot,
    JobRequest,
    Placement,
    place,
    queue_order,
)

NOW = 1_800_000_000.0
DAY = 86_400.0
DEVICE_TYPES = ("h100", "a100")
WORLD_SIZE_SETS = [(1,), (2,), (4,), (8,), (1, 2, 4), (2, 4, 8), (1, 2, 4, 8), (4, 8), (16,)]


def make_fleet(rng: random.Random, owned: int, leased: int) -> list[ClusterSnapshot]:
    fleet = []
    for i in range(owned + leased):
        kind = OWNED if i < owned else LEASED
        lease_start = lease_end = None
        if kind == LEASED:
            lease_start = NOW + rng.choice([-7 * DAY, -DAY, -60.0, 600.0])
            lease_end = NOW + rng.choice([-60.0, 120.0, 3600.0, DAY, 7 * DAY])
        fleet.append(
            ClusterSnapshot(
                name=f"{kind}-{i:03d}",
                kind=kind,
                device_type=rng.choice(DEVICE_TYPES),
                devices_total=8,
                devices_free=rng.randint(1, 8),
                cost_per_device_hour=0.0 if kind == OWNED else rng.uniform(2.0, 6.0),
                lease_start=lease_start,
                lease_end=lease_end,
                reachable=rng.random() > 0.03,
            )
        )
    return fleet


def make_jobs(rng: random.Random, n: int, fleet: Sequence[ClusterSnapshot]) -> list[JobRequest]:
    names = [c.name for c in fleet]
    jobs = []
    for i in range(n):
        submitted = NOW - rng.uniform(0, DAY)
        budget = None if rng.random() < 0.4 else rng.uniform(10, 5000)
        jobs.append(
            JobRequest(
                job_id=f"job-{i:05d}",
                world_sizes=rng.choice(WORLD_SIZE_SETS),
                device_types=() if rng.random() < 0.7 else tuple(rng.sample(DEVICE_TYPES, 2)),
                clusters=() if rng.random() < 0.9 else tuple(rng.sample(names, 3)),
                priority=rng.randint(0, 3),
                submitted_at=submitted,
                waiting_since=rng.uniform(submitted, NOW),
                budget=budget,
                cost_so_far=0.0 if budget is None else rng.uniform(0, 0.5) * budget,
                expected_remaining_s=None if rng.random() < 0.5 else rng.uniform(60, DAY),
                spill_after_s=rng.choice([0.0, 60.0, 600.0]),
                min_lease_left_s=rng.choice([0.0, 300.0, 3600.0]),
            )
        )
    rng.shuffle(jobs)
    return jobs


def baseline(jobs: Sequence[JobRequest], fleet: Sequence[ClusterSnapshot], now: float) -> int:
    """Sort the queue and evaluate the candidate filter on every (job, cluster) pair."""
    candidates = 0
    for job in queue_order(jobs):
        for c in fleet:
            if (
                c.reachable
                and (not job.device_types or c.device_type in job.device_types)
                and (c.kind == OWNED or c.lease_start <= now < c.lease_end)
            ):
                candidates += 1
    return candidates


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--owned", type=int, default=60)
    p.add_argument("--leased", type=int, default=40)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    rng = random.Random(a.seed)
    fleet = make_fleet(rng, a.owned, a.leased)
    jobs = make_jobs(rng, a.jobs, fleet)

    decisions = place(jobs, fleet, NOW)  # warm-up, and the decisions summarised below
    kinds = {c.name: c.kind for c in fleet}
    placed = Counter(kinds[d.cluster] for d in decisions if isinstance(d, Placement))
    waiting = len(decisions) - sum(placed.values())

    watch = CpuWatch()
    place_s, base_s = [], []
    for i in range(a.repeats):
        # Alternate which goes first so slow drift of a shared machine hits both alike.
        runs = [(place_s, place), (base_s, baseline)]
        for samples, fn in runs if i % 2 == 0 else runs[::-1]:
            samples.append(timed(lambda fn=fn: fn(jobs, fleet, NOW)))
    place_med, base_med = median(place_s), median(base_s)

    print(describe(with_torch=False))
    print(
        f"workload: {len(jobs)} jobs, {len(fleet)} clusters ({a.owned} owned, {a.leased} "
        f"leased, 8 devices each, {sum(c.devices_free for c in fleet)} free), seed {a.seed}"
    )
    print(
        f"decisions: {placed[OWNED]} placed on owned, {placed[LEASED]} on leased, {waiting} waiting"
    )
    print(
        f"place():  median {place_med * 1e3:.1f} ms over {a.repeats} repeats "
        f"(min {min(place_s) * 1e3:.1f}, max {max(place_s) * 1e3:.1f}) = "
        f"{len(jobs) / place_med:,.0f} decisions/s"
    )
    print(
        f"baseline (queue_order + candidate filter over jobs x clusters): median "
        f"{base_med * 1e3:.1f} ms (min {min(base_s) * 1e3:.1f}, max {max(base_s) * 1e3:.1f})"
    )
    print(f"ratio place/baseline: {place_med / base_med:.2f}x")
    print(watch.report())


if __name__ == "__main__":
    main()
