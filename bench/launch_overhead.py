"""What launching through Spillway costs against plain torchrun: time to first step, step time.

    python bench/launch_overhead.py                 # model=tiny, 2 ranks, 150 steps, 3 repeats
    python bench/launch_overhead.py --repeats 2 --steps 100

It brings up the local fleet (`spillway fleet up`: home with 2 devices on one node, the partner
with 4 on two nodes, isolated, with its S3 server), starts the controller with one warm-up job
(and runs one warm-up torchrun, so both sides find a warm page cache), then runs, interleaved
(ABBA), the same recipe command both ways:

- Spillway: `spillway launch <overrides> --json` on the running fleet and controller; the job
  is placed on home (free, owned) with 2 ranks as Ray actors.
- Baseline: `torchrun --standalone --nproc_per_node=2 -m recipes.gpt.train <overrides>
  run_dir=...`, a cold process tree started the ordinary way.

Every metrics record carries `time`, the wall clock at the end of its step, so the figures come
from the records themselves (Spillway's through the controller's API, torchrun's from its run
dir's segments), not from when a poll saw them:

1. Launch to first step: from invoking the command to the first record's `time`. Medians over
   the repeats, ratio spillway/torchrun. For Spillway it also prints where the time went, from
   the job's events (the controller's API, as `spillway status JOB --json` shows them).
2. Steady state: the median `step_time_s` of the records after --warmup, and the period (the
   `time` between the record after the warmup and the last one, divided by the steps between):
   what the loop sustains, including what it does outside its own timer. Ratios spillway/torchrun.

The fleet's own processes (Ray daemons, the S3 server, the controller, and the Ray workers
running Spillway's ranks) are not children of this process, so their CPU is counted separately
(from /proc, by the clusters' and the server's session ids) and left out of the "other
processes" share. The fleet stays up while the torchrun runs go, so its idle cost is printed
too: the baseline shares the machine with it, as it would on a machine where the fleet runs.
At the end the fleet is brought down (`spillway fleet down`) and the temp dir removed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import common  # bench/common.py (this directory is on sys.path; it puts the repo there too)
from common import SPILLWAY, BenchError, median, ms
from machine import CpuWatch, busy_idle_s, describe, usable_cores

JOB_ENDED = {"SUCCEEDED", "FAILED", "CANCELLED"}


# ---- CPU of the fleet's processes -----------------------------------------------------------


class FleetCpu(common.SessionCpu):
    """SessionCpu over the local fleet's sessions (each cluster's and its S3 server's); it also
    notes the niceness of Spillway's rank processes (Ray starts its workers at 15)."""

    def __init__(self, home: Path) -> None:
        from orchestrator.fleet.local import LocalCluster
        from orchestrator.fleet.s3server import S3Server, record_path

        sessions = set()
        for fdir in (home / "fleet").iterdir():
            for rec in sorted(fdir.glob("*.json")):
                cluster = LocalCluster.load(rec)
                if cluster is not None:
                    sessions.add(cluster.session_id)
            server = S3Server.load(record_path(fdir))
            if server is not None:
                sessions.add(server.session_id)
        self.rank_nice: set[int] = set()
        super().__init__(sessions)

    def _scan(self) -> dict[tuple[int, int], int]:
        got = super()._scan()
        for pid, _ in got:
            if self.last[pid].name.startswith(b"ray::RankActor"):
                self.rank_nice.add(self.last[pid].nice)
        return got


class Watch:
    """CpuWatch with the fleet's processes taken out of "other processes"."""

    def __init__(self, fleet: FleetCpu) -> None:
        self.fleet, self.cpu, self.fleet0 = fleet, CpuWatch(), fleet.total_s()

    def shares(self) -> tuple[float, float] | None:
        """(other processes, fleet processes) as shares of all cores since start."""
        got = self.cpu.foreign()
        if got is None:
            return None
        foreign, wall, _ = got
        cores = usable_cores() or 1
        fleet = self.fleet.total_s() - self.fleet0
        return max(0.0, foreign - fleet) / (wall * cores), fleet / (wall * cores)

    def text(self) -> str:
        got = self.shares()
        return "unknown" if got is None else f"{got[0]:.0%} (fleet's own {got[1]:.0%})"


# ---- running one run ------------------------------------------------------------------------


def _cpu_since(busy0) -> float | None:
    """The whole machine's busy CPU seconds since the /proc/stat reading busy0."""
    busy1 = busy_idle_s()
    return None if busy0 is None or busy1 is None else busy1[0] - busy0[0]


def run_spillway(a, env: dict, home: Path, overrides: list[str], r: int, sample=None) -> dict:
    busy0, began = busy_idle_s(), time.time()
    launch = subprocess.run(
        [*SPILLWAY, "launch", *overrides, f"run_name=bench-{r}", "--json"],
        cwd=common.REPO, env=env, capture_output=True, text=True, timeout=a.timeout_s,
    )  # fmt: skip
    cli_s = time.time() - began
    if launch.returncode != 0:
        raise BenchError(f"spillway launch failed ({launch.returncode}):\n{launch.stderr[-3000:]}")
    job_id = json.loads(launch.stdout)["job_id"]
    client = common.api_client(home)
    deadline, sampled = time.monotonic() + a.timeout_s, 0.0
    while (status := client.job(job_id))["state"] not in JOB_ENDED:
        if sample and time.monotonic() - sampled > 1.0:
            sample()
            sampled = time.monotonic()
        if time.monotonic() > deadline:
            raise BenchError(f"{job_id} is {status['state']} after {a.timeout_s} s")
        time.sleep(a.poll_s)
    cpu_s = _cpu_since(busy0)
    if sample:
        sample()
    attempts = [(x["cluster"], x["world_size"], x["state"]) for x in status["attempts"]]
    if attempts != [("home", a.nproc, "SUCCEEDED")]:
        raise BenchError(f"{job_id} ran as {attempts}, not once on home with {a.nproc}")
    records = [x for x in client.metrics(job_id) if x["attempt"] == 1]
    common.check_steps(records, a.steps, a.nproc, job_id)
    events = {}
    for e in status["events"]:
        events.setdefault(e["to"] or e["kind"], e["at"])
    return {
        "job_id": job_id,
        "records": records,
        "first_s": records[0]["time"] - began,
        "cli_s": cli_s,
        "picked_s": events.get("STARTING", began) - began,  # the controller tick that placed it
        "running_s": events.get("RUNNING", began) - began,  # the tick that saw the Ray job run
        "done_s": events.get("SUCCEEDED", began) - began,  # when the controller recorded it
        "cpu_s": cpu_s,
    }


def run_torchrun(a, env: dict, root: Path, overrides: list[str], r: int, sample=None) -> dict:
    run_dir = root / f"tr-{r}"
    cmd = common.torchrun(a.nproc, "-m", "recipes.gpt.train", *overrides, f"run_dir={run_dir}")
    if a.torchrun_nice:  # e.g. 15, the niceness Ray gives its workers, Spillway's ranks included
        cmd = ["nice", "-n", str(a.torchrun_nice), *cmd]
    log = root / f"tr-{r}.log"
    with log.open("wb") as out:
        busy0, began = busy_idle_s(), time.time()
        proc = subprocess.Popen(
            cmd, cwd=common.REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + a.timeout_s
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise BenchError(f"torchrun still running after {a.timeout_s} s")
                if sample:
                    sample()
                try:
                    proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    pass
            done_s, cpu_s = time.time() - began, _cpu_since(busy0)
        finally:
            if proc.poll() is None:
                common.kill_tree(proc)
    if proc.returncode != 0:
        raise BenchError(f"torchrun failed ({proc.returncode}):\n{common.tail(log)}")
    records = common.read_metrics(run_dir)
    common.check_steps(records, a.steps, a.nproc, str(run_dir))
    return {
        "records": records,
        "first_s": records[0]["time"] - began,
        "done_s": done_s,
        "cpu_s": cpu_s,
        "cmd": cmd,
    }


def steady(a, run: dict) -> tuple[float, float]:
    """(median step_time_s after the warmup, wall period over the same steps)."""
    records = run["records"]
    step = median(x["step_time_s"] for x in records[a.warmup :])
    t = [x["time"] for x in records]
    return step, (t[-1] - t[a.warmup]) / (a.steps - 1 - a.warmup)


# ---- the driver -----------------------------------------------------------------------------


def driver(a: argparse.Namespace, root: Path) -> None:
    # What torchrun sets for >1 rank, and Ray for a 1-CPU actor.
    env = common.bench_env(root, omp_threads=1, tmpdir=root / "tmp")

    def overrides_for(steps: int) -> list[str]:
        return [
            f"model={a.model}",
            "data=synthetic",
            f"data.seq_len={a.seq_len}",
            f"trainer.global_batch_size={a.global_batch}",
            f"trainer.micro_batch_size={a.micro_batch}",
            "trainer.device=cpu",
            f"resources.devices={a.nproc}",
            f"trainer.max_steps={steps}",
            f"checkpoint.every_steps={steps + 1}",
        ]

    overrides = overrides_for(a.steps)

    print(describe())
    print(
        f"launch_overhead: model={a.model} ranks={a.nproc} global_batch={a.global_batch} "
        f"micro_batch={a.micro_batch} seq_len={a.seq_len} steps={a.steps} warmup={a.warmup} "
        f"repeats={a.repeats} poll={a.poll_s:g} s torchrun_nice={a.torchrun_nice}; "
        f"SPILLWAY_HOME={root}"
    )
    spill, torch_runs = [], []
    try:
        t = time.monotonic()
        common.spillway(env, "fleet", "up", timeout_s=600)
        print(f"fleet up: {time.monotonic() - t:.1f} s")
        clusters = json.loads(common.spillway(env, "fleet", "status", "--json"))["clusters"]
        if not all(c["reachable"] for c in clusters):
            raise BenchError(f"a cluster of the fleet is not reachable: {clusters}")
        # Warm-up: the first launch starts the controller; then one torchrun for the page cache.
        t = time.monotonic()
        warm = common.spillway(env, "launch", *overrides_for(5), "run_name=warmup", "--json")
        warm = json.loads(warm)["job_id"]
        common.spillway(
            env, "wait", warm, "--timeout", str(a.timeout_s), timeout_s=a.timeout_s + 60
        )
        print(f"warm-up job {warm} (controller start included): {time.monotonic() - t:.1f} s")
        warm_args = argparse.Namespace(**{**vars(a), "steps": 5})
        run_torchrun(warm_args, env, root, overrides_for(5), -1)

        fleet = FleetCpu(root)
        whole, idle_fleet, idle_wall = Watch(fleet), 0.0, 0.0
        for r in range(a.repeats):
            watch = Watch(fleet)
            order = ("spillway", "torchrun") if r % 2 == 0 else ("torchrun", "spillway")
            for side in order:
                time.sleep(a.settle_s)  # let the previous run's processes wind down
                if side == "spillway":
                    spill.append(run_spillway(a, env, root, overrides, r, fleet.sample))
                else:
                    f0, w0 = fleet.total_s(), time.monotonic()
                    torch_runs.append(run_torchrun(a, env, root, overrides, r, fleet.sample))
                    idle_fleet += fleet.total_s() - f0
                    idle_wall += time.monotonic() - w0
            if r == 0:
                print("spillway command:", common.show([*SPILLWAY, "launch", *overrides, "--json"]))
                print("torchrun command:", common.show(torch_runs[0]["cmd"]))
            s, b = spill[-1], torch_runs[-1]
            (ss, sp), (bs, bp) = steady(a, s), steady(a, b)
            print(
                f"  repeat {r + 1} ({order[0]} first): first step spillway {s['first_s']:.2f} s "
                f"[launch cli {s['cli_s']:.2f} s, placed {s['picked_s']:.2f} s, RUNNING seen "
                f"{s['running_s']:.2f} s], torchrun {b['first_s']:.2f} s; step_time_s "
                f"{ms(ss)} vs {ms(bs)} ({ss / bs:.3f}), period {ms(sp)} vs {ms(bp)} "
                f"({sp / bp:.3f}); other processes' cpu {watch.text()}"
            )
        cores = usable_cores() or 1
        whole_shares, whole_report = whole.shares(), whole.cpu.report()
        rank_nice = fleet.rank_nice
    finally:
        common.fleet_down(env)
        common.kill_leftovers(root, "`spillway fleet down`")

    med = median
    sf, bf = med(x["first_s"] for x in spill), med(x["first_s"] for x in torch_runs)
    st = [steady(a, x) for x in spill]
    bt = [steady(a, x) for x in torch_runs]
    ss, sp = med(x[0] for x in st), med(x[1] for x in st)
    bs, bp = med(x[0] for x in bt), med(x[1] for x in bt)
    print(
        f"launch to first step, median of {len(spill)}: spillway {sf:.2f} s "
        f"(launch cli {med(x['cli_s'] for x in spill):.2f} s, placed by the controller at "
        f"{med(x['picked_s'] for x in spill):.2f} s), torchrun {bf:.2f} s"
    )
    per_s = common.listing(x["first_s"] for x in spill)
    per_b = common.listing(x["first_s"] for x in torch_runs)
    print(f"  per run: spillway {per_s} s; torchrun {per_b} s")
    print(f"ratio spillway/torchrun (first step): {sf / bf:.2f}  (+{sf - bf:.2f} s)")
    print(
        f"steady state after {a.warmup} warmup steps, median of per-run medians: "
        f"step_time_s spillway {ms(ss)}, torchrun {ms(bs)}; "
        f"period spillway {ms(sp)}, torchrun {ms(bp)}"
    )
    per_s, per_b = ", ".join(ms(x[0]) for x in st), ", ".join(ms(x[0]) for x in bt)
    print(f"  per run step_time_s: spillway {per_s}; torchrun {per_b}")
    print(f"ratio spillway/torchrun (step_time_s): {ss / bs:.3f}")
    print(f"ratio spillway/torchrun (period):      {sp / bp:.3f}")
    sd, bd = med(x["done_s"] for x in spill), med(x["done_s"] for x in torch_runs)
    print(
        f"launch to done ({a.steps} steps and the final checkpoint), median: spillway {sd:.2f} s "
        f"(until the controller records SUCCEEDED, at its next 1 s tick), torchrun {bd:.2f} s "
        f"(until it exits)"
    )
    if all(x["cpu_s"] is not None for x in spill + torch_runs):
        sc, bc = med(x["cpu_s"] for x in spill), med(x["cpu_s"] for x in torch_runs)
        print(
            f"whole machine's cpu time per run, launch to done, median: spillway {sc:.1f} "
            f"cpu-s, torchrun {bc:.1f} cpu-s (+{sc - bc:.1f}; both include the idle fleet)"
        )
    print(
        f"niceness of the ranks: spillway {sorted(rank_nice) or 'not seen'} (Ray's worker "
        f"niceness), torchrun {a.torchrun_nice}"
    )
    print(
        f"the idle fleet (2 Ray clusters of 3 nodes, the S3 server, the controller) used {idle_fleet:.1f} cpu-s over "
        f"{idle_wall:.0f} s of torchrun runs ({idle_fleet / idle_wall / cores:.0%} of {cores} cores)"
    )
    got = whole_shares
    print(
        whole_report.replace(
            "cpu use by other processes",
            "cpu use by other processes (fleet's processes included)",
        )
    )
    if got is not None:
        print(
            f"other processes' cpu share, the fleet's processes left out: {got[0]:.0%} "
            f"(the fleet's own: {got[1]:.0%})"
        )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=("tiny", "small"), default="tiny")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--warmup", type=int, default=20, help="leading steps left out of steady state")
    p.add_argument("--repeats", type=int, default=3, help="spillway/torchrun pairs, ABBA order")
    p.add_argument("--nproc", type=int, default=2, help="ranks on each side")
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--poll-s", type=float, default=0.2, help="job state polling interval (the API)")
    p.add_argument("--settle-s", type=float, default=3.0, help="pause before each measured run")
    p.add_argument(
        "--torchrun-nice",
        type=int,
        default=0,
        help="run the baseline under `nice -n N` (Ray starts its workers, the ranks included, at 15)",
    )
    p.add_argument("--timeout-s", type=int, default=600, help="per run")
    p.add_argument("--keep", action="store_true", help="keep the state dir, runs and logs")
    a = p.parse_args()
    if not 0 <= a.warmup < a.steps - 2:
        p.error("--warmup must leave at least two measured steps")
    with common.state_dir("swb-", a.keep, short=True) as root:
        driver(a, root)


if __name__ == "__main__":
    common.run_main(main)
