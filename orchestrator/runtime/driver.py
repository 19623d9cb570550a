"""The driver of one attempt, submitted to a cluster through the Ray Jobs API.

It reserves the whole gang as one placement group (all ranks or none), starts one rank actor
per device, and waits. If any rank fails, the others are stopped at once rather than left to
hang in a collective, and the driver exits non-zero.

    SPILLWAY_ATTEMPT_SPEC='{...}' python -m orchestrator.runtime.driver
"""

from __future__ import annotations

import signal
import sys
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.runtime.drain import request_drain
from orchestrator.runtime.rank import RankActor
from orchestrator.runtime.spec import EXIT_DRAINED, EXIT_NO_CAPACITY, AttemptSpec


def _device_options(device_resource: str) -> dict:
    if device_resource == "GPU":
        return {"num_gpus": 1}
    return {"resources": {device_resource: 1}}


def run_attempt(spec: AttemptSpec) -> int:
    bundle = {
        "CPU": 1,
        **({"GPU": 1} if spec.device_resource == "GPU" else {spec.device_resource: 1}),
    }
    pg = placement_group([bundle] * spec.world_size, strategy="PACK")
    began = time.monotonic()
    ready, _ = ray.wait([pg.ready()], timeout=spec.reserve_timeout_s)
    if not ready:
        print(
            f"spillway: could not reserve {spec.world_size} x {spec.device_resource} within "
            f"{spec.reserve_timeout_s:.0f}s",
            file=sys.stderr,
        )
        remove_placement_group(pg)
        return EXIT_NO_CAPACITY
    print(
        f"spillway: reserved {spec.world_size} device(s) in {time.monotonic() - began:.2f}s",
        flush=True,
    )

    ranks = [
        RankActor.options(
            num_cpus=1,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=i
            ),
            **_device_options(spec.device_resource),
        ).remote()
        for i in range(spec.world_size)
    ]
    master = ray.get(ranks[0].rendezvous_address.remote())
    running = [
        r.run.remote(i, spec.world_size, master, spec.overrides) for i, r in enumerate(ranks)
    ]
    code = 0
    pending = list(running)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            if ray.get(done[0]).drained:
                code = EXIT_DRAINED  # all ranks agreed to drain; the others return drained too
        except Exception as exc:  # a rank failed or its process died
            rank = running.index(done[0])
            print(
                f"spillway: rank {rank} failed: {type(exc).__name__}: {exc}",
                file=sys.stderr,
                flush=True,
            )
            code = 1
            break
    for actor in ranks:
        ray.kill(actor)
    remove_placement_group(pg)
    return code


def main() -> None:
    spec = AttemptSpec.from_env()
    # A partner taking its nodes back sends SIGTERM: pass it on as a drain, then wait for it.
    signal.signal(signal.SIGTERM, lambda *_: request_drain(spec.run_dir, "SIGTERM to the driver"))
    ray.init(address="auto", log_to_driver=True)
    print(
        f"spillway: job {spec.job_id} attempt {spec.attempt} on {spec.world_size} rank(s)",
        flush=True,
    )
    sys.exit(run_attempt(spec))


if __name__ == "__main__":
    main()
