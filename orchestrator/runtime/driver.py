"""The driver of one attempt, submitted to a cluster through the Ray Jobs API.

It first checks that the cluster's Python has what Spillway needs (its own code came in the
job's runtime_env; its dependencies did not), reads the run config the controller put in the
attempt's run dir, reserves the whole gang as one placement group (all ranks or none), starts
one rank actor per device, and hands each the run config. If any rank fails, the others are
stopped at once rather than left to hang in a collective, and the driver exits non-zero:
exit_codes.RANK_LOST when a rank's process died (a fault the controller recovers from),
exit_codes.BROKEN_ENVIRONMENT when the cluster cannot run Spillway (it moves the job
elsewhere), 2 for a bad config, 1 for any other exception.

    SPILLWAY_ATTEMPT_SPEC='{...}' python -m orchestrator.runtime.driver

Only the standard library and leaf modules are imported at the top: the environment check
must be able to say that torch or ray is missing instead of dying on the import.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

import orchestrator
from orchestrator import exit_codes
from orchestrator.runtime import requirements
from orchestrator.runtime.spec import AttemptSpec

if TYPE_CHECKING:
    import ray

# How long the other ranks get to report after one fails.
RANK_FAILURE_GRACE_S = 10.0
# How long the rank actors get to start (their runtime_env included) and answer.
RANK_START_TIMEOUT_S = 120.0


def _say(line: str, error: bool = False) -> None:
    print(f"spillway: {line}", file=sys.stderr if error else sys.stdout, flush=True)


def _device_options(device_resource: str) -> dict:
    if device_resource == "GPU":
        return {"num_gpus": 1}
    return {"resources": {device_resource: 1}}


def _error_of(ref: ray.ObjectRef) -> Exception | None:
    import ray

    try:
        ray.get(ref)
    except Exception as err:
        return err
    return None


def exit_code_for(errors: list[Exception]) -> int:
    """A dead rank process is a fault (retried); a runtime_env that cannot be set up on a node
    is the cluster's fault; an exception the recipe raised is the job's own."""
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError, RuntimeEnvSetupError

    from orchestrator.config.errors import ConfigError

    if any(isinstance(e, RuntimeEnvSetupError) for e in errors):
        return exit_codes.BROKEN_ENVIRONMENT
    if any(isinstance(e, (RayActorError, GetTimeoutError)) for e in errors):
        return exit_codes.RANK_LOST
    causes = [e.cause if isinstance(e, RayTaskError) else e for e in errors]
    if any(isinstance(c, ConfigError) for c in causes):
        return 2  # as the recipe exits on a bad config
    return 1


def _start_ranks(spec: AttemptSpec, pg, wanted: list[str]) -> tuple[list, list, Any]:
    """One rank actor per bundle: (the actors, what each one's node lacks or None, rank 0's
    address). The driver checked its own node; a gang across nodes must check every one."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from orchestrator.runtime.rank import RankActor

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
    checks = [r.environment_problem.remote(wanted) for r in ranks]
    master = ranks[0].rendezvous_address.remote()
    found = ray.get([*checks, master], timeout=RANK_START_TIMEOUT_S)
    return ranks, found[:-1], found[-1]


def run_attempt(spec: AttemptSpec, run_config: dict[str, Any], wanted: list[str]) -> int:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = {
        "CPU": 1,
        **({"GPU": 1} if spec.device_resource == "GPU" else {spec.device_resource: 1}),
    }
    pg = placement_group([bundle] * spec.world_size, strategy="PACK")
    began = time.monotonic()
    ready, _ = ray.wait([pg.ready()], timeout=spec.reserve_timeout_s)
    if not ready:
        _say(
            f"could not reserve {spec.world_size} x {spec.device_resource} within "
            f"{spec.reserve_timeout_s:.0f}s",
            error=True,
        )
        remove_placement_group(pg)
        return exit_codes.NO_CAPACITY
    nodes = set(ray.util.placement_group_table(pg).get("bundles_to_node_id", {}).values())
    _say(
        f"reserved {spec.world_size} device(s) on {len(nodes)} node(s) "
        f"in {time.monotonic() - began:.2f}s"
    )

    try:
        ranks, problems, master = _start_ranks(spec, pg, wanted)
    except Exception as err:
        _say(f"rank actors did not start: {type(err).__name__}: {err}", error=True)
        remove_placement_group(pg)  # kills the actors placed in it
        return exit_code_for([err])
    broken = sorted({p for p in problems if p})
    if broken:
        _say(f"this cluster cannot run Spillway: {'; '.join(broken)}", error=True)
        code = exit_codes.BROKEN_ENVIRONMENT
    else:
        code = _train(ranks, spec.world_size, master, run_config)
    for actor in ranks:
        ray.kill(actor)
    remove_placement_group(pg)
    return code


def _train(ranks: list, world_size: int, master, run_config: dict[str, Any]) -> int:
    import ray

    running = [r.run.remote(i, world_size, master, run_config) for i, r in enumerate(ranks)]
    code = 0
    pending = list(running)
    while pending:
        # A timeout, so that the main thread comes back to Python and a SIGTERM's handler runs.
        done, pending = ray.wait(pending, num_returns=1, timeout=0.5)
        if not done:
            continue
        try:
            if ray.get(done[0])["drained"]:
                # All ranks agreed to drain; the others return drained too.
                code = exit_codes.DRAINED
        except Exception as first:
            # The ranks still in a collective with the failed one fail within moments; hear
            # them out, so that one rank's death is told apart from a bug that raised.
            ended, _ = ray.wait(pending, num_returns=len(pending), timeout=RANK_FAILURE_GRACE_S)
            errors = [(running.index(done[0]), first)] + [
                (running.index(ref), err) for ref in ended if (err := _error_of(ref)) is not None
            ]
            for rank, err in errors:
                _say(f"rank {rank} failed: {type(err).__name__}: {err}", error=True)
            return exit_code_for([err for _, err in errors])
    return code


def main() -> None:
    spec = AttemptSpec.from_env()
    # Which Spillway runs: the runtime_env's copy, not whatever the cluster has installed.
    _say(f"Spillway imported from {os.path.dirname(os.path.abspath(orchestrator.__file__))}")
    problem = requirements.check(requirements.RUNTIME)
    if problem:
        _say(f"this cluster cannot run Spillway: {problem}", error=True)
        sys.exit(exit_codes.BROKEN_ENVIRONMENT)

    from orchestrator.rundir import RunDir

    run_files = RunDir(spec.run_dir)
    try:
        run_config = run_files.read_run_config()
    except Exception as exc:  # the cluster cannot reach its own storage: not the job's fault
        _say(f"cannot read the run config in {spec.run_dir}: {exc}", error=True)
        sys.exit(exit_codes.BROKEN_ENVIRONMENT)
    wanted = requirements.needed(run_config)
    problem = requirements.check([r for r in wanted if r not in requirements.RUNTIME])
    if problem:
        _say(f"this cluster cannot run Spillway: {problem}", error=True)
        sys.exit(exit_codes.BROKEN_ENVIRONMENT)

    import ray

    ray.init(address="auto", log_to_driver=True)
    # A partner taking its nodes back sends SIGTERM: pass it on as a drain, then wait for it.
    # Installed after ray.init, which sets a SIGTERM handler of its own that just exits.
    signal.signal(signal.SIGTERM, lambda *_: run_files.request_drain("SIGTERM to the driver"))
    _say(f"job {spec.job_id} attempt {spec.attempt} on {spec.world_size} rank(s)")
    sys.exit(run_attempt(spec, run_config, wanted))


if __name__ == "__main__":
    main()
