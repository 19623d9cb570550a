"""The driver of one attempt, submitted to a cluster through the Ray Jobs API.

It reserves the whole gang as one placement group (all ranks or none), starts one rank actor
per device, and waits. If any rank fails, the others are stopped at once rather than left to
hang in a collective, and the driver exits non-zero: exit_codes.RANK_LOST when a rank's process died
(a fault the controller recovers from), 2 for a bad config, 1 for any other exception.

    SPILLWAY_ATTEMPT_SPEC='{...}' python -m orchestrator.runtime.driver
"""

from __future__ import annotations

import signal
import sys
import time

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator import exit_codes
from orchestrator.config.errors import ConfigError
from orchestrator.rundir import RunDir
from orchestrator.runtime.rank import RankActor
from orchestrator.runtime.spec import AttemptSpec

# How long the other ranks get to report after one fails.
RANK_FAILURE_GRACE_S = 10.0


def _device_options(device_resource: str) -> dict:
    if device_resource == "GPU":
        return {"num_gpus": 1}
    return {"resources": {device_resource: 1}}


def _error_of(ref: ray.ObjectRef) -> Exception | None:
    try:
        ray.get(ref)
    except Exception as err:
        return err
    return None


def exit_code_for(errors: list[Exception]) -> int:
    """A dead rank process is a fault (retried); an exception the recipe raised is the job's own."""
    if any(isinstance(e, RayActorError) for e in errors):
        return exit_codes.RANK_LOST
    causes = [e.cause if isinstance(e, RayTaskError) else e for e in errors]
    if any(isinstance(c, ConfigError) for c in causes):
        return 2  # as the recipe exits on a bad config
    return 1


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
        return exit_codes.NO_CAPACITY
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
        # A timeout, so that the main thread comes back to Python and a SIGTERM's handler runs.
        done, pending = ray.wait(pending, num_returns=1, timeout=0.5)
        if not done:
            continue
        try:
            if ray.get(done[0])["drained"]:
                code = (
                    exit_codes.DRAINED
                )  # all ranks agreed to drain; the others return drained too
        except Exception as first:
            # The ranks still in a collective with the failed one fail within moments; hear
            # them out, so that one rank's death is told apart from a bug that raised.
            ended, _ = ray.wait(pending, num_returns=len(pending), timeout=RANK_FAILURE_GRACE_S)
            errors = [(running.index(done[0]), first)] + [
                (running.index(ref), err) for ref in ended if (err := _error_of(ref)) is not None
            ]
            for rank, err in errors:
                print(
                    f"spillway: rank {rank} failed: {type(err).__name__}: {err}",
                    file=sys.stderr,
                    flush=True,
                )
            code = exit_code_for([err for _, err in errors])
            break
    for actor in ranks:
        ray.kill(actor)
    remove_placement_group(pg)
    return code


def main() -> None:
    spec = AttemptSpec.from_env()
    ray.init(address="auto", log_to_driver=True)
    # A partner taking its nodes back sends SIGTERM: pass it on as a drain, then wait for it.
    # Installed after ray.init, which sets a SIGTERM handler of its own that just exits.
    run_files = RunDir(spec.run_dir)
    signal.signal(signal.SIGTERM, lambda *_: run_files.request_drain("SIGTERM to the driver"))
    print(
        f"spillway: job {spec.job_id} attempt {spec.attempt} on {spec.world_size} rank(s)",
        flush=True,
    )
    sys.exit(run_attempt(spec))


if __name__ == "__main__":
    main()
