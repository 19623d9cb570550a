"""Drain to first step on the new cluster: what `spillway migrate` costs, against a move by hand.

    python bench/drain_to_first_step.py                 # model=tiny, 3 migrations
    python bench/drain_to_first_step.py --repeats 2 --model small

It makes a short state dir under /tmp (Ray's unix socket paths must stay short), launches one
job there with

    spillway launch model=tiny data=synthetic data.seq_len=32 checkpoint.every_steps=10
        trainer.max_steps=2000 run_name=bench placement.clusters=[home] --json

(the first launch starts the local fleet, home with 2 devices and partner with 4, and the
controller), waits until the job's metrics reach step --start-step, then migrates it
--repeats times, alternating home -> partner -> home ...: `spillway migrate JOB --to X`,
then `spillway status JOB --json` every --poll-s until the attempt after it has a first
step. Before each further migration the new attempt trains --settle-steps steps.

Parts of one migration, from the controller's attempt records and the drained attempt's
DRAINED.json (rank 0 writes it once the drain checkpoint is committed):

  total = next.first_step_at - prev.interrupted_at   (drain request to the first step there)
  save  = ack.at - prev.interrupted_at               (to the committed checkpoint and the ack)
  copy  = next.copy_s                                (the verified copy to the new storage)
  start = next.first_step_at - next.submitted_at     (Ray job to the first step)
  rest  = total - save - copy - start                (the controller's polling and placement)

Baseline, in the same run once the job is cancelled and no attempt runs: what a person would
do to move the same job by hand, --repeats times:

  copy  = orchestrator.checkpoint.transfer.plain_copy of the last migration's checkpoint
          (the same bytes, no hashing, not committed) to a scratch dir;
  start = a cold `python -m torch.distributed.run --standalone --nproc_per_node=2
          -m recipes.gpt.train <the job's overrides> resources.devices=2 run_dir=SCRATCH
          checkpoint.storage=<a scratch copy holding that committed step>`, from process start
          until its metrics.jsonl has a first line (polled every 20 ms); its process tree is
          then killed;
  save  = the Spillway migration's save of the same index (both must checkpoint);
  total = save + copy + start.

Prints each migration and baseline repeat, the medians of every part, the ratios
spillway/baseline, and the machine. The fleet is always brought down (`spillway fleet down`)
and the state dir removed (unless --keep).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `orchestrator.` importable
    sys.path.insert(0, str(REPO))

from machine import describe  # noqa: E402  bench/machine.py (this directory is on sys.path)

from orchestrator.checkpoint import catalog  # noqa: E402
from orchestrator.checkpoint.transfer import plain_copy  # noqa: E402

SPILLWAY = [sys.executable, "-m", "orchestrator.cli"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
JOB_ENDED = {"SUCCEEDED", "FAILED", "CANCELLED"}
ATTEMPT_RUNS = {"RUNNING", "SUBMITTED"}
ATTEMPT_ENDED_BADLY = {"FAILED", "LOST", "STOPPED"}
PARTS = ("total", "save", "copy", "start", "rest")


class BenchError(RuntimeError):
    pass


# ---- talking to spillway ------------------------------------------------------------------


def sw(env: dict, *args: str, timeout: float = 300) -> str:
    done = subprocess.run(
        [*SPILLWAY, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise BenchError(
            f"spillway {' '.join(args)} failed (exit {done.returncode}):\n"
            f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        )
    return done.stdout


def job_status(env: dict, job: str) -> dict:
    return json.loads(sw(env, "status", job, "--json"))


def job_metrics(env: dict, job: str) -> list[dict]:
    return [json.loads(x) for x in sw(env, "metrics", job, "--json").splitlines() if x.strip()]


def wait_for_step(env: dict, job: str, attempt: int, step: int, a) -> None:
    """Until the job is RUNNING and `attempt` has recorded `step` (or a later one)."""
    deadline = time.monotonic() + a.timeout_s
    while True:
        st = job_status(env, job)
        if st["state"] in JOB_ENDED:
            raise BenchError(f"{job} ended ({st['state']}: {st['reason']}) before step {step}")
        mine = [r["step"] for r in job_metrics(env, job) if r["attempt"] == attempt]
        if st["state"] == "RUNNING" and mine and mine[-1] >= step:
            return
        if time.monotonic() > deadline:
            last = mine[-1] if mine else None
            raise BenchError(f"{job}: attempt {attempt} at step {last}, not {step}, in time")
        time.sleep(a.poll_s)


def migrate(env: dict, root: Path, job: str, to: str, a) -> dict:
    """One `spillway migrate`, followed until the next attempt's first step; its parts."""
    st = job_status(env, job)
    prev = st["attempts"][-1]
    if st["state"] != "RUNNING" or prev["state"] != "RUNNING":
        raise BenchError(f"{job} is {st['state']} (attempt {prev['attempt']} {prev['state']})")
    asked = time.time()
    sw(env, "migrate", job, "--to", to)
    deadline = time.monotonic() + a.timeout_s
    while True:
        time.sleep(a.poll_s)
        st = job_status(env, job)
        after = [x for x in st["attempts"] if x["attempt"] > prev["attempt"]]
        if after and after[-1]["first_step_at"] is not None:
            break
        if st["state"] in JOB_ENDED:
            raise BenchError(f"{job} ended ({st['state']}: {st['reason']}) while migrating")
        if time.monotonic() > deadline:
            raise BenchError(f"{job}: no first step on {to} within {a.timeout_s} s")
    prev = next(x for x in st["attempts"] if x["attempt"] == prev["attempt"])
    nxt = after[-1]
    odd = []
    if len(after) != 1 or any(x["state"] in ATTEMPT_ENDED_BADLY for x in after):
        odd.append(
            "attempts after the drain: " + ", ".join(f"{x['attempt']} {x['state']}" for x in after)
        )
    if nxt["cluster"] != to:
        odd.append(f"the new attempt runs on {nxt['cluster']}, not {to}")
    ack_path = (
        root / "storage" / prev["cluster"] / "jobs" / job / f"attempt-{prev['attempt']}"
        / "DRAINED.json"
    )  # fmt: skip
    ack = json.loads(ack_path.read_text())
    for key, got in (("interrupted_at", prev), ("submitted_at", nxt), ("copy_s", nxt)):
        if got[key] is None:
            raise BenchError(f"{job}: attempt {got['attempt']} has no {key}: {got}")
    if ack["step"] != nxt["copy_step"]:
        odd.append(f"drained at step {ack['step']} but copied step {nxt['copy_step']}")
    if nxt["first_step"] != (nxt["copy_step"] or 0) + 1:
        odd.append(f"first step {nxt['first_step']} after copied step {nxt['copy_step']}")
    if (
        nxt["resume_s"] is not None
        and abs(nxt["resume_s"] - (nxt["first_step_at"] - prev["interrupted_at"])) > 1e-6
    ):
        odd.append(f"status resume_s {nxt['resume_s']:.3f} s differs from the total")
    parts = {
        "total": nxt["first_step_at"] - prev["interrupted_at"],
        "save": ack["at"] - prev["interrupted_at"],
        "copy": nxt["copy_s"],
        "start": nxt["first_step_at"] - nxt["submitted_at"],
    }
    parts["rest"] = parts["total"] - parts["save"] - parts["copy"] - parts["start"]
    return {
        "parts": parts,
        "prev": prev,
        "next": nxt,
        "ack": ack,
        "request_s": prev["interrupted_at"] - asked,  # the migrate command to the DRAIN file
        # Where rest and start went, by the controller's ticks (about 1 s apart):
        "exit_s": (prev["ended_at"] or ack["at"]) - ack["at"],  # ack to the drained end seen
        "place_s": nxt["created_at"] - (prev["ended_at"] or ack["at"]),  # to the new attempt
        "submit_s": nxt["submitted_at"] - nxt["created_at"] - nxt["copy_s"],  # copy done to submit
        "running_s": (nxt["started_at"] or nxt["submitted_at"]) - nxt["submitted_at"],
        "odd": odd,
    }


# ---- the baseline: by hand ----------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _tree(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _signal(pids, sig) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of `proc` and every descendant of it.

    torchrun starts each rank in a session of its own (torch.distributed.elastic's
    SubprocessHandler: start_new_session=True), so the group alone would leave the ranks
    running. The tree is frozen first so that nothing forks or is reparented meanwhile.
    """
    pids = _tree(proc.pid)
    _signal(pids, signal.SIGSTOP)
    pids = list(dict.fromkeys(pids + _tree(proc.pid)))
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _signal(pids, signal.SIGKILL)
    proc.wait(timeout=60)


def torchrun_to_first_step(
    env: dict, overrides: list[str], run_dir: Path, storage: Path, a
) -> tuple[float, dict]:
    """Seconds from starting a cold torchrun until its metrics.jsonl has a first line."""
    cmd = [*TORCHRUN, "--standalone", f"--nproc_per_node={a.nproc}", "-m", "recipes.gpt.train"]
    cmd += [*overrides, f"resources.devices={a.nproc}", f"run_dir={run_dir}"]
    cmd += [f"checkpoint.storage={storage}"]
    metrics = run_dir / "metrics.jsonl"
    log = run_dir.with_suffix(".log")
    with log.open("wb") as out:
        began = time.time()
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + a.timeout_s
            while True:
                try:
                    head = metrics.read_bytes()
                except FileNotFoundError:
                    head = b""
                if b"\n" in head:
                    seen = time.time()
                    break
                if proc.poll() is not None:
                    raise BenchError(
                        f"torchrun exited ({proc.returncode}) before its first step:\n"
                        f"{log.read_text(errors='replace')[-4000:]}"
                    )
                if time.monotonic() > deadline:
                    raise BenchError(f"torchrun: no first step within {a.timeout_s} s")
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                kill_tree(proc)
    return seen - began, {"first": json.loads(head.split(b"\n", 1)[0]), "cmd": cmd}


# ---- the driver ---------------------------------------------------------------------------


def leftovers(root: Path) -> list[tuple[int, str]]:
    """Live processes that carry the state dir in their environment or command line."""
    mark, env_mark = str(root).encode(), f"SPILLWAY_HOME={root}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if mark in cmdline or env_mark + b"\0" in environ + b"\0":
            found.append((int(entry.name), cmdline.replace(b"\0", b" ").decode(errors="replace")))
    return found


def _row(name: str, values: dict) -> str:
    cells = "".join(
        f"{values[p]:>9.3f}" if values.get(p) is not None else f"{'-':>9}" for p in PARTS
    )
    return f"  {name:<22}{cells}"


def driver(a: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="sw-", dir="/tmp"))
    (root / "tmp").mkdir()
    env = dict(os.environ, SPILLWAY_HOME=str(root), TMPDIR=str(root / "tmp"))
    env["OMP_NUM_THREADS"] = "1"  # what torchrun sets for >1 rank, and Ray for a 1-CPU actor
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    overrides = [
        f"model={a.model}",
        "data=synthetic",
        f"data.seq_len={a.seq_len}",
        f"checkpoint.every_steps={a.every_steps}",
        f"trainer.max_steps={a.max_steps}",
        "run_name=bench",
        "placement.clusters=[home]",
    ]
    print(describe())
    print(
        f"drain_to_first_step: model={a.model} seq_len={a.seq_len} every_steps={a.every_steps} "
        f"max_steps={a.max_steps} start_step={a.start_step} settle_steps={a.settle_steps} "
        f"repeats={a.repeats} poll={a.poll_s:g} s; SPILLWAY_HOME={root}"
    )
    migrations, base, job = [], [], None
    try:
        began = time.monotonic()
        job = json.loads(sw(env, "launch", *overrides, "--json", timeout=900))["job_id"]
        print(f"launch (fleet up and controller start included): {time.monotonic() - began:.1f} s")
        print("spillway command: spillway launch " + " ".join(overrides) + " --json")
        wait_for_step(env, job, 1, a.start_step, a)

        for r in range(a.repeats):
            if r:
                cur = job_status(env, job)["attempts"][-1]
                wait_for_step(env, job, cur["attempt"], cur["first_step"] + a.settle_steps, a)
            to = "partner" if r % 2 == 0 else "home"
            m = migrate(env, root, job, to, a)
            migrations.append(m)
            p, prev, nxt = m["parts"], m["prev"], m["next"]
            print(
                f"  migration {r + 1}: {prev['cluster']} -> {nxt['cluster']} (attempt "
                f"{prev['attempt']} -> {nxt['attempt']}, world {prev['world_size']} -> "
                f"{nxt['world_size']}), drained at step {m['ack']['step']}, copied step "
                f"{nxt['copy_step']} ({nxt['copy_bytes_done'] / 1e6:.2f} MB): total "
                f"{p['total']:.2f} s = save {p['save']:.3f} + copy {p['copy']:.3f} + start "
                f"{p['start']:.2f} + rest {p['rest']:.2f} s [migrate command to drain request "
                f"{m['request_s']:.2f} s, not in total]"
            )
            print(
                f"    rest: ack to the drained attempt's end seen {m['exit_s']:.2f} s, to the new "
                f"attempt {m['place_s']:.2f} s, copy done to submit {m['submit_s']:.2f} s; "
                f"start: Ray job RUNNING seen after {m['running_s']:.2f} s, first step "
                f"{p['start'] - m['running_s']:.2f} s later"
            )
            for line in m["odd"]:
                print(f"    odd: {line}")

        sw(env, "cancel", job)
        deadline = time.monotonic() + a.timeout_s
        while any(x["state"] in ATTEMPT_RUNS for x in job_status(env, job)["attempts"]):
            if time.monotonic() > deadline:
                raise BenchError(f"{job}: an attempt still runs {a.timeout_s} s after cancel")
            time.sleep(a.poll_s)

        # The checkpoint the last migration copied, read from the cluster it left (the copy
        # on the target may have been pruned by the checkpoints it saved since).
        last = migrations[-1]
        step = last["next"]["copy_step"]
        src = root / "storage" / last["prev"]["cluster"] / "jobs" / job / "checkpoints"
        src_step = Path(catalog.step_dir(str(src), step))
        scratch = root / "by-hand"
        scratch.mkdir()
        for r in range(a.repeats):
            dst = scratch / f"copy-{r}"
            copy_s = plain_copy(str(src), str(dst), step)
            shutil.rmtree(dst)
            storage = scratch / f"ckpt-{r}"
            shutil.copytree(src_step, storage / src_step.name)
            start_s, info = torchrun_to_first_step(env, overrides, scratch / f"run-{r}", storage, a)
            if info["first"]["step"] != step + 1:
                print(f"    odd: torchrun's first step is {info['first']['step']}, not {step + 1}")
            save_s = migrations[r]["parts"]["save"]
            base.append(
                {"total": save_s + copy_s + start_s, "save": save_s, "copy": copy_s,
                 "start": start_s, "rest": None}
            )  # fmt: skip
            print(
                f"  by hand {r + 1}: plain copy of step {step} {copy_s:.3f} s, torchrun to first "
                f"step {start_s:.2f} s (world {info['first']['world_size']}, step "
                f"{info['first']['step']})"
            )
            if r == 0:
                cmd = info["cmd"]
                at = cmd.index(TORCHRUN[-1])
                print("torchrun command: torchrun " + " ".join(cmd[at + 1 :]))
    except BaseException:
        if job is not None:
            try:
                print(sw(env, "status", job, timeout=60))
            except Exception as exc:  # the status is only a diagnostic here
                print(f"(no status: {exc})")
        raise
    finally:
        down = subprocess.run(
            [*SPILLWAY, "fleet", "down"], cwd=REPO, env=env, capture_output=True, text=True
        )
        print("fleet down:", " / ".join(down.stdout.strip().splitlines()) or down.stderr[-500:])
        left = leftovers(root)
        if left:
            print(f"WARNING: {len(left)} process(es) of this run outlived `spillway fleet down`:")
            for pid, cmdline in left:
                print(f"  {pid}: {cmdline[:200]}")
            _signal([pid for pid, _ in left], signal.SIGKILL)
            print("  killed them (SIGKILL, by PID)")
        if a.keep:
            print(f"kept the state dir under {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    med = statistics.median
    spill = {p: med(m["parts"][p] for m in migrations) for p in PARTS}
    hand = {p: med(b[p] for b in base) for p in PARTS if p != "rest"}
    n = len(migrations)
    print(f"medians over {n} migration(s) and {len(base)} by-hand repeat(s), seconds:")
    print(f"  {'':<22}" + "".join(f"{p:>9}" for p in PARTS))
    print(_row("spillway", spill))
    print(_row("by hand (baseline)", hand))
    ratios = ", ".join(f"{p} {spill[p] / hand[p]:.2f}" for p in PARTS if hand.get(p))
    print(
        f"ratio spillway/baseline: {ratios} (total +{spill['total'] - hand['total']:.2f} s; "
        f"the baseline has no controller latency, and its save is Spillway's)"
    )
    per_s = ", ".join(f"{m['parts']['total']:.2f}" for m in migrations)
    per_b = ", ".join(f"{b['total']:.2f}" for b in base)
    print(f"  per run total: spillway {per_s} s; by hand {per_b} s")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=("tiny", "small"), default="tiny")
    p.add_argument("--max-steps", type=int, default=2000, help="trainer.max_steps of the job")
    p.add_argument("--start-step", type=int, default=30, help="first migration after this step")
    p.add_argument(
        "--settle-steps", type=int, default=10, help="steps a new attempt trains before the next"
    )
    p.add_argument("--repeats", type=int, default=3, help="migrations, alternating directions")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--every-steps", type=int, default=10, help="checkpoint.every_steps")
    p.add_argument("--nproc", type=int, default=2, help="torchrun ranks of the baseline")
    p.add_argument("--poll-s", type=float, default=1.0, help="`spillway status` polling interval")
    p.add_argument("--timeout-s", type=int, default=600, help="per wait")
    p.add_argument("--keep", action="store_true", help="keep the state dir, runs and logs")
    a = p.parse_args()
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    driver(a)


if __name__ == "__main__":
    main()
