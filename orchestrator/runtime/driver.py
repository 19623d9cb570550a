"""The driver of one attempt, submitted to a cluster through the Ray Jobs API.

It first checks that the cluster's Python has what Spillway needs (its own code came in the
job's runtime_env; its dependencies did not), reads the run config the controller put in the
attempt's run dir, reserves the whole gang as one placement group (all ranks or none), starts
one rank actor per device, and hands each the run config. Each rank returns a plain result;
one whose recipe raised says whose fault it was (orchestrator.runtime.failures). When a rank
fails, the others get RANK_FAILURE_GRACE_S to report and are then stopped rather than left to
hang in a collective. The exit code, from every result heard (see exit_code_for):

    0                   every rank finished
    DRAINED (75)        every rank stopped at one step with a committed checkpoint
    FENCED (76)         a rank found a newer attempt of the job: nothing was committed
    BROKEN_ENVIRONMENT  a node could not set up the runtime_env, or lacks what Spillway needs
    RANK_LOST (69)      a rank's process or node died (killed, OOM, node gone)
    INFRASTRUCTURE (74) storage, a collective, the network, or the driver itself failed
    BAD_CONFIG (2)      the run config was refused
    USER_ERROR (1)      the user's code raised
    NO_CAPACITY (3)     the gang could not be reserved in time

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
from orchestrator.runtime.failures import (
    KINDS,
    describe,
    failure_code,
    is_peer_failure,
    traceback_tail,
)
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


def _outcome_of(ref: ray.ObjectRef) -> dict | BaseException:
    """A rank's result, or the Ray error that stands in for one (its process died...)."""
    import ray

    try:
        return ray.get(ref)
    except Exception as err:
        return err


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def failure_of(outcome: dict | BaseException) -> dict | None:
    """What one rank's outcome says went wrong, as failures.failure_report spells it (with
    the kinds "lost" and "environment" beside user, config and infrastructure); None when the
    rank finished, drained or was fenced."""
    if isinstance(outcome, dict):
        return outcome.get("failed")
    from ray.exceptions import RayError, RayTaskError, RuntimeEnvSetupError

    line = describe(outcome)
    if isinstance(outcome, RuntimeEnvSetupError):
        code, kind, peer = exit_codes.BROKEN_ENVIRONMENT, "environment", False
    elif isinstance(outcome, RayTaskError):
        # rank.run catches the recipe's exceptions; what still gets here raised before or
        # around it, and lost its traceback on the way: its type and chain decide.
        cause = outcome.cause if outcome.cause is not None else outcome
        code, peer = failure_code(cause), is_peer_failure(cause)
        kind, line = KINDS[code], describe(cause)
    elif isinstance(outcome, RayError):  # RayActorError, GetTimeoutError, NodeDiedError, OOM...
        code, kind, peer = exit_codes.RANK_LOST, "lost", False
    else:  # the driver's own call failed, not the rank
        code, kind, peer = exit_codes.INFRASTRUCTURE, "infrastructure", False
    tb = _tail(str(outcome)) if isinstance(outcome, RayError) else traceback_tail(outcome)
    return {"code": code, "kind": kind, "message": line, "traceback": tb, "peer": peer}


def exit_code_for(outcomes: list[dict | BaseException]) -> int:
    """The attempt's exit code from what its ranks returned, in the order the driver heard them.

    A fenced rank decides first: a newer attempt exists, so nothing of this one matters. Then
    a node that cannot set up the runtime_env (the cluster's fault), then a rank whose process
    died (RANK_LOST: whatever the others raised followed from it). Otherwise the first failure
    heard decides, except that a broken collective (a peer closed, was lost or timed out) gives
    way to any failure of a rank's own: when rank 3 raises a KeyError, ranks 0-2 are left in
    the all-reduce and fail only after it, or time out, so their errors are its consequence and
    the job's fault is the user's. Collective errors alone are INFRASTRUCTURE.
    """
    if any(isinstance(o, dict) and o.get("fenced") for o in outcomes):
        return exit_codes.FENCED
    failures = [f for f in map(failure_of, outcomes) if f is not None]
    for code in (exit_codes.BROKEN_ENVIRONMENT, exit_codes.RANK_LOST):
        if any(f["code"] == code for f in failures):
            return code
    if failures:
        own = [f for f in failures if not f["peer"]]
        return (own or failures)[0]["code"]
    if any(isinstance(o, dict) and o.get("drained") for o in outcomes):
        return exit_codes.DRAINED
    return 0


def _report(heard: list[tuple[int, dict | BaseException]]) -> None:
    """One line per failed rank on stderr; its traceback's tail in the driver log."""
    for rank, outcome in heard:
        failed = failure_of(outcome)
        if failed is None:
            continue
        _say(f"rank {rank} failed ({failed['kind']}): {failed['message']}", error=True)
        for line in failed["traceback"].splitlines():
            print(f"  rank {rank} | {line}", flush=True)


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
        _say(f"rank actors did not start: {describe(err)}", error=True)
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


def _hear(running: list) -> list[tuple[int, dict | BaseException]]:
    """Every rank's outcome as (rank, outcome), in the order they came in. After the first
    rank that stops early (failed or fenced) the others get RANK_FAILURE_GRACE_S: those still
    in a collective with it fail within moments, or hang there until they are stopped."""
    import ray

    heard: list[tuple[int, dict | BaseException]] = []
    pending, deadline = list(running), None
    while pending and (deadline is None or time.monotonic() < deadline):
        # A timeout, so that the main thread comes back to Python and a SIGTERM's handler runs.
        done, pending = ray.wait(pending, num_returns=1, timeout=0.5)
        for ref in done:
            outcome = _outcome_of(ref)
            heard.append((running.index(ref), outcome))
            stopped_early = failure_of(outcome) is not None or (
                isinstance(outcome, dict) and outcome.get("fenced")
            )
            if stopped_early and deadline is None:
                deadline = time.monotonic() + RANK_FAILURE_GRACE_S
    if pending:
        silent = ", ".join(str(running.index(ref)) for ref in pending)
        _say(f"rank(s) {silent} did not report within {RANK_FAILURE_GRACE_S:.0f}s: stopping them")
    return heard


def _train(ranks: list, world_size: int, master, run_config: dict[str, Any]) -> int:
    running = [r.run.remote(i, world_size, master, run_config) for i, r in enumerate(ranks)]
    heard = _hear(running)
    _report(heard)
    code = exit_code_for([outcome for _, outcome in heard])
    if code not in (0, exit_codes.DRAINED):
        meaning = exit_codes.RESERVED.get(code) or KINDS.get(code, "")
        _say(f"attempt exits {code} ({meaning})", error=True)
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

    try:
        code = _attempt(spec, run_files, run_config, wanted)
    except Exception as exc:  # the driver's own failure (Ray, its storage): never the user's
        _say(f"the driver failed: {describe(exc)}", error=True)
        print(traceback_tail(exc), flush=True)
        code = exit_codes.INFRASTRUCTURE
    sys.exit(code)


def _attempt(spec: AttemptSpec, run_files, run_config: dict[str, Any], wanted: list[str]) -> int:
    import ray

    ray.init(address="auto", log_to_driver=True)
    # A partner taking its nodes back sends SIGTERM: pass it on as a drain, then wait for it.
    # Installed after ray.init, which sets a SIGTERM handler of its own that just exits.
    signal.signal(signal.SIGTERM, lambda *_: run_files.request_drain("SIGTERM to the driver"))
    _say(f"job {spec.job_id} attempt {spec.attempt} on {spec.world_size} rank(s)")
    # Ray shuts down in its own exit hook. Calling ray.shutdown() here ended the job 0.5-1 s
    # sooner after a drain, but lost the ranks' last log lines on the way to the driver's log
    # under load (an e2e case caught "committed checkpoint step 6" missing), so it is not done.
    return run_attempt(spec, run_config, wanted)


if __name__ == "__main__":
    main()
