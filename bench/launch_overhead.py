"""What launching through Spillway costs against plain torchrun: time to first step, step time.

    python bench/launch_overhead.py                 # model=tiny, 2 ranks, 150 steps, 3 repeats
    python bench/launch_overhead.py --repeats 2 --steps 100

It brings up the local fleet (`spillway fleet up`: two real Ray clusters, home with 2 devices
and partner with 4), starts the controller with one warm-up job (and runs one warm-up torchrun,
so both sides find a warm page cache), then runs, interleaved (ABBA), the same recipe command
both ways:

- Spillway: `spillway launch <overrides> --json` on the running fleet and controller; the job
  is placed on home (free, owned) with 2 ranks as Ray actors.
- Baseline: `torchrun --standalone --nproc_per_node=2 -m recipes.gpt.train <overrides>
  run_dir=...`, a cold process tree started the ordinary way.

For each run the benchmark polls the run's metrics.jsonl (Spillway's attempt directory,
`$SPILLWAY_HOME/storage/home/jobs/JOB/attempt-1/`) every --poll-ms and stamps each new record
with the wall clock. Figures:

1. Launch to first step: from invoking the command until the first metrics record exists.
   Medians over the repeats, ratio spillway/torchrun. For Spillway it also prints where the
   time went, from the job's events (`spillway status JOB --json`).
2. Steady state: the median `step_time_s` of the records after --warmup, and the period (wall
   time between the record after the warmup and the last one, divided by the steps between):
   what the loop sustains, including what it does outside its own timer. Ratios spillway/torchrun.

The fleet's own processes (Ray daemons, the controller, and the Ray workers running Spillway's
ranks) are not children of this process, so their CPU is counted separately (from /proc, by
the clusters' session ids) and left out of the "other processes" share. The fleet stays up
while the torchrun runs go, so its idle cost is printed too: the baseline shares the machine
with it, as it would on a machine where the fleet runs.
At the end the fleet is brought down (`spillway fleet down`) and the temp dir removed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import (  # bench/machine.py (this directory is on sys.path)
    CpuWatch,
    _busy_idle_s,
    describe,
)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLK = os.sysconf("SC_CLK_TCK")


def _tool(name: str, module: str) -> list[str]:
    """The console script of this interpreter (not a shim in front of it), else `python -m`."""
    script = BIN / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


SPILLWAY = _tool("spillway", "orchestrator.cli")
TORCHRUN = _tool("torchrun", "torch.distributed.run")


# ---- CPU of the fleet's processes -----------------------------------------------------------


class FleetCpu:
    """CPU seconds the local clusters' processes used since this object was made.

    The fleet's processes are every PID in the clusters' Ray sessions plus their descendants
    (a Ray job's driver runs in a session of its own). Their CPU is read from /proc/PID/stat
    at each sample() and kept per process, because a Ray worker that ends (a rank actor killed
    at the end of its job) takes its CPU time with it: the raylet does not collect it. What a
    process used after its last sample is missed; the benchmark samples once a second while
    it follows a run and again when the run's last record has arrived.
    """

    def __init__(self, home: Path) -> None:
        from orchestrator.fleet.local import LocalCluster

        self.sessions = set()
        for rec in sorted((home / "fleet" / "local").glob("*.json")):
            cluster = LocalCluster.load(rec)
            if cluster is not None:
                self.sessions.add(cluster.session_id)
        self.rank_nice: set[int] = set()  # niceness seen on Spillway's rank processes
        self.base = self._scan()
        self.seen = dict(self.base)

    def _scan(self) -> dict[tuple[int, int], int]:
        """{(pid, start time): utime + stime in ticks} of the fleet's processes now."""
        procs, children = {}, {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    head, tail = f.read().rsplit(b")", 1)
            except OSError:
                continue
            fields = tail.split()
            pid, ppid = int(entry.name), int(fields[1])
            procs[pid] = (int(fields[3]), int(fields[19]), int(fields[11]) + int(fields[12]))
            children.setdefault(ppid, []).append(pid)
            if int(fields[3]) in self.sessions and b"(ray::RankActor" in head:
                self.rank_nice.add(int(fields[16]))  # field 19 of stat: nice
        todo = [pid for pid, (sid, _, _) in procs.items() if sid in self.sessions]
        keep = set()
        while todo:
            pid = todo.pop()
            if pid not in keep:
                keep.add(pid)
                todo += children.get(pid, [])
        return {(pid, procs[pid][1]): procs[pid][2] for pid in keep}

    def sample(self) -> None:
        for key, ticks in self._scan().items():
            self.seen[key] = max(self.seen.get(key, 0), ticks)

    def total_s(self) -> float:
        self.sample()
        return sum(t - self.base.get(k, 0) for k, t in self.seen.items()) / CLK


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
        cores = len(os.sched_getaffinity(0)) or 1
        fleet = self.fleet.total_s() - self.fleet0
        return max(0.0, foreign - fleet) / (wall * cores), fleet / (wall * cores)

    def text(self) -> str:
        got = self.shares()
        return "unknown" if got is None else f"{got[0]:.0%} (fleet's own {got[1]:.0%})"


# ---- running and following one run ----------------------------------------------------------


def _check(done: subprocess.CompletedProcess, what: str) -> str:
    if done.returncode != 0:
        sys.exit(
            f"launch_overhead: {what} failed (exit {done.returncode}):\n"
            f"{(done.stdout or '')[-2000:]}\n{(done.stderr or '')[-3000:]}"
        )
    return done.stdout


def _sw(env: dict, *args: str, timeout: float = 300) -> str:
    done = subprocess.run(
        [*SPILLWAY, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    return _check(done, "spillway " + " ".join(args))


class Follower:
    """Polls one metrics.jsonl and stamps each complete new record with the wall clock."""

    def __init__(self, path: Path) -> None:
        self.path, self.size, self.buf, self.arrivals = path, 0, b"", []

    def poll(self) -> None:
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            return
        if size == self.size:
            return
        now = time.time()
        with open(self.path, "rb") as f:
            f.seek(self.size)
            chunk = f.read()
        self.size += len(chunk)
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        self.arrivals += [now] * len(lines)

    def follow(self, steps: int, poll_s: float, alive, timeout_s: float, sample=None) -> None:
        """Until `steps` records are in; `sample` (the fleet's CPU) is called about once a second."""
        deadline = time.monotonic() + timeout_s
        sampled = time.monotonic()
        while len(self.arrivals) < steps:
            self.poll()
            if sample and (len(self.arrivals) >= steps or time.monotonic() - sampled > 1.0):
                sample()
                sampled = time.monotonic()
            if len(self.arrivals) >= steps:
                break
            if not alive() or time.monotonic() > deadline:
                self.poll()
                if len(self.arrivals) < steps:
                    raise RuntimeError(
                        f"{self.path}: {len(self.arrivals)} of {steps} records, and the run "
                        f"{'ended' if not alive() else 'timed out'}"
                    )
            time.sleep(poll_s)


def _cpu_since(busy0) -> float | None:
    """The whole machine's busy CPU seconds since the /proc/stat reading busy0."""
    busy1 = _busy_idle_s()
    return None if busy0 is None or busy1 is None else busy1[0] - busy0[0]


def run_spillway(a, env: dict, home: Path, overrides: list[str], r: int, sample=None) -> dict:
    from orchestrator.controller.job_states import TERMINAL
    from orchestrator.controller.state import ControllerState

    busy0, began = _busy_idle_s(), time.time()
    launch = subprocess.Popen(
        [*SPILLWAY, "launch", *overrides, f"run_name=bench-{r}", "--json"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, err = launch.communicate(timeout=a.timeout_s)
    cli_s = time.time() - began
    _check(subprocess.CompletedProcess(launch.args, launch.returncode, out, err), "spillway launch")
    job_id = json.loads(out)["job_id"]
    path = home / "storage" / "home" / "jobs" / job_id / "attempt-1" / "metrics.jsonl"
    follower = Follower(path)
    try:
        follower.follow(a.steps, a.poll_ms / 1e3, lambda: True, a.timeout_s, sample)
    except RuntimeError:
        print(_sw(env, "status", job_id))
        raise
    # The job is done when the controller records it so (its next tick after the driver exits);
    # read from its state here rather than through a CLI process, whose start would add CPU.
    with ControllerState.open(home / "controller.db") as state:
        deadline = time.monotonic() + a.timeout_s
        while state.get_job(job_id).state not in TERMINAL and time.monotonic() < deadline:
            time.sleep(0.1)
    done_s, cpu_s = time.time() - began, _cpu_since(busy0)
    waited = subprocess.run(
        [*SPILLWAY, "wait", job_id, "--timeout", str(a.timeout_s)],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    _check(waited, f"spillway wait {job_id}")
    status = json.loads(_sw(env, "status", job_id, "--json"))
    attempts = [(x["cluster"], x["world_size"], x["state"]) for x in status["attempts"]]
    if attempts != [("home", a.nproc, "SUCCEEDED")]:
        sys.exit(f"launch_overhead: {job_id} ran as {attempts}, not once on home with {a.nproc}")
    records = [json.loads(x) for x in _sw(env, "metrics", job_id, "--json").splitlines()]
    events = {}
    for e in status["events"]:
        events.setdefault(e["to"] or e["kind"], e["at"])
    return {
        "job_id": job_id,
        "records": records,
        "arrivals": follower.arrivals,
        "first_s": follower.arrivals[0] - began,
        "cli_s": cli_s,
        "picked_s": events.get("STARTING", began) - began,  # the controller tick that placed it
        "running_s": events.get("RUNNING", began) - began,  # the tick that saw the Ray job run
        "done_s": done_s,
        "cpu_s": cpu_s,
    }


def run_torchrun(a, env: dict, root: Path, overrides: list[str], r: int, sample=None) -> dict:
    run_dir = root / f"tr-{r}"
    cmd = [*TORCHRUN, "--standalone", f"--nproc_per_node={a.nproc}", "-m", "recipes.gpt.train"]
    cmd += [*overrides, f"run_dir={run_dir}"]
    if a.torchrun_nice:  # e.g. 15, the niceness Ray gives its workers, Spillway's ranks included
        cmd = ["nice", "-n", str(a.torchrun_nice), *cmd]
    log = root / f"tr-{r}.log"
    follower = Follower(run_dir / "metrics.jsonl")
    with log.open("w") as f:
        busy0, began = _busy_idle_s(), time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            alive = lambda: proc.poll() is None  # noqa: E731
            follower.follow(a.steps, a.poll_ms / 1e3, alive, a.timeout_s, sample)
            proc.wait(timeout=a.timeout_s)
            done_s, cpu_s = time.time() - began, _cpu_since(busy0)
        except BaseException:
            if proc.poll() is None:
                proc.terminate()  # torchrun stops its ranks on SIGTERM
                proc.wait(timeout=60)
            print(log.read_text()[-4000:])
            raise
    if proc.returncode != 0:
        sys.exit(
            f"launch_overhead: torchrun failed ({proc.returncode}):\n{log.read_text()[-4000:]}"
        )
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "records": records,
        "arrivals": follower.arrivals,
        "first_s": follower.arrivals[0] - began,
        "done_s": done_s,
        "cpu_s": cpu_s,
        "cmd": cmd,
    }


def steady(a, run: dict) -> tuple[float, float]:
    """(median step_time_s after the warmup, wall period over the same steps)."""
    records = run["records"]
    if [x["step"] for x in records] != list(range(1, a.steps + 1)) or any(
        x["world_size"] != a.nproc for x in records
    ):
        sys.exit("launch_overhead: a run's metrics lack steps or have another world size")
    step = statistics.median(x["step_time_s"] for x in records[a.warmup :])
    t = run["arrivals"]
    return step, (t[-1] - t[a.warmup]) / (a.steps - 1 - a.warmup)


# ---- the driver -----------------------------------------------------------------------------


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms"


def driver(a: argparse.Namespace) -> None:
    # Short on purpose: Ray's unix socket paths under the state dir must stay within 107 bytes,
    # and the longest (ROOT/ray/partner/session_<date>_<time>_<us>_<pid>/sockets/dash_MetricsHead)
    # takes about 80 of them beside ROOT. Under $TMPDIR if that is short enough, else /tmp.
    base = tempfile.gettempdir()
    root = Path(tempfile.mkdtemp(prefix="swb-", dir=base if len(base) <= 12 else "/tmp"))
    (root / "tmp").mkdir()
    env = dict(os.environ, SPILLWAY_HOME=str(root), TMPDIR=str(root / "tmp"))
    env["OMP_NUM_THREADS"] = "1"  # what torchrun sets for >1 rank, and Ray for a 1-CPU actor
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)

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
        f"repeats={a.repeats} poll={a.poll_ms:g} ms torchrun_nice={a.torchrun_nice}; "
        f"SPILLWAY_HOME={root}"
    )
    spill, torch_runs = [], []
    fleet_up = False
    try:
        t = time.monotonic()
        fleet_up = True
        _sw(env, "fleet", "up")
        print(f"fleet up: {time.monotonic() - t:.1f} s")
        clusters = json.loads(_sw(env, "fleet", "status", "--json"))["clusters"]
        if not all(c["reachable"] for c in clusters):
            sys.exit(f"launch_overhead: a cluster of the fleet is not reachable: {clusters}")
        # Warm-up: the first launch starts the controller; then one torchrun for the page cache.
        t = time.monotonic()
        warm = json.loads(_sw(env, "launch", *overrides_for(5), "run_name=warmup", "--json"))[
            "job_id"
        ]
        _sw(env, "wait", warm, "--timeout", str(a.timeout_s), timeout=a.timeout_s + 60)
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
                print("spillway command:", " ".join(["spillway", "launch", *overrides, "--json"]))
                cmd = torch_runs[0]["cmd"]
                at = cmd.index(TORCHRUN[0])
                print(
                    "torchrun command:",
                    " ".join([*cmd[:at], "torchrun", *cmd[at + len(TORCHRUN) :]]),
                )
            s, b = spill[-1], torch_runs[-1]
            (ss, sp), (bs, bp) = steady(a, s), steady(a, b)
            print(
                f"  repeat {r + 1} ({order[0]} first): first step spillway {s['first_s']:.2f} s "
                f"[launch cli {s['cli_s']:.2f} s, placed {s['picked_s']:.2f} s, RUNNING seen "
                f"{s['running_s']:.2f} s], torchrun {b['first_s']:.2f} s; step_time_s "
                f"{_ms(ss)} vs {_ms(bs)} ({ss / bs:.3f}), period {_ms(sp)} vs {_ms(bp)} "
                f"({sp / bp:.3f}); "
                f"other processes' cpu {watch.text()}"
            )
        cores = len(os.sched_getaffinity(0)) or 1
        whole_shares, whole_report = whole.shares(), whole.cpu.report()
        rank_nice = fleet.rank_nice
    finally:
        if fleet_up:
            down = subprocess.run(
                [*SPILLWAY, "fleet", "down"], cwd=REPO, env=env, capture_output=True, text=True
            )
            print("fleet down:", " / ".join(down.stdout.strip().splitlines()) or down.stderr[-500:])
        if a.keep:
            print(f"kept the state dir, run directories and logs under {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    med = statistics.median
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
    per_s = ", ".join(f"{x['first_s']:.2f}" for x in spill)
    per_b = ", ".join(f"{x['first_s']:.2f}" for x in torch_runs)
    print(f"  per run: spillway {per_s} s; torchrun {per_b} s")
    print(f"ratio spillway/torchrun (first step): {sf / bf:.2f}  (+{sf - bf:.2f} s)")
    print(
        f"steady state after {a.warmup} warmup steps, median of per-run medians: "
        f"step_time_s spillway {_ms(ss)}, torchrun {_ms(bs)}; "
        f"period spillway {_ms(sp)}, torchrun {_ms(bp)}"
    )
    per_s, per_b = ", ".join(_ms(x[0]) for x in st), ", ".join(_ms(x[0]) for x in bt)
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
        f"the idle fleet (2 Ray clusters + controller) used {idle_fleet:.1f} cpu-s over "
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
    p.add_argument("--poll-ms", type=float, default=10.0, help="metrics.jsonl polling interval")
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
    driver(a)


if __name__ == "__main__":
    main()
