"""Drain to first step on the new cluster: what `spillway migrate` costs, against a move by hand.

    python bench/drain_to_first_step.py                          # the partner's bucket -> home
    python bench/drain_to_first_step.py --mode alternate         # home <-> partner
    python bench/drain_to_first_step.py --repeats 2 --model small

It makes a short state dir under /tmp (Ray's unix socket paths must stay short), brings the
local fleet up there (`spillway fleet up`: home, 2 devices on one node, storage on local disk;
the partner, 4 devices on two nodes, isolated, storage in a bucket of the fleet's own S3 server
on 127.0.0.1), and launches one job:

    spillway launch model=tiny data=synthetic data.seq_len=32 checkpoint.every_steps=10
        trainer.max_steps=2000 logger.metrics_flush_s=0.1 run_name=bench
        placement.clusters=[home]            (--mode alternate)
        placement.clusters=[partner,home]    (--mode partner-to-home: it starts on the partner)
        --json

It waits until the job's metrics reach step --start-step, then migrates it --repeats times with
`spillway migrate JOB --to X`, polling the controller's API (the job as `spillway status JOB
--json` shows it) every --poll-s until the attempt after it has a first step:

  alternate:        home -> partner -> home ..., every migration measured;
  partner-to-home:  partner -> home, each measured; between two of them the job goes back to
                    the partner (printed as the return trip, not measured against the baseline).

Before each further migration the new attempt trains --settle-steps steps.

Parts of one migration, from the controller's attempt records and the drained attempt's drain
acknowledgement (DRAINED.json in its run dir, read through orchestrator.rundir from the store
of the cluster it ran on; rank 0 writes it once the drain checkpoint is committed):

  total = next.first_step_at - prev.interrupted_at   (drain request to the first step there)
  save  = ack.at - prev.interrupted_at               (to the committed checkpoint and the ack)
  copy  = next.copy_s                                (the verified copy to the new storage)
  start = next.first_step_at - next.submitted_at     (Ray job to the first step; where the
                                                     copy ended within the tick that placed
                                                     the attempt, from the copy's end instead)
  rest  = total - save - copy - start                (the controller's polling and placement)

first_step_at is the `time` of the first metrics record (the wall clock at the end of the step).

Baseline, in the same run once the job is cancelled and no attempt runs: what a person would
do to move the same job by hand (in partner-to-home, the default, exactly the same move: out of
the partner's bucket, onto home; in alternate the by-hand start is still on home, so a move onto
the isolated partner, whose start reads and writes through its S3 server, is held against a
cheaper one), --repeats times, from the checkpoint the last measured
migration copied, on the store of the cluster it left (the partner's bucket in
partner-to-home):

  copy  = common.plain_copy (bench/common.py) of that step's objects (no hashing, not
          committed) to a scratch dir on local disk;
  start = a cold `torchrun --standalone --nproc_per_node=2 -m recipes.gpt.train <the job's
          overrides> resources.devices=2 run_dir=SCRATCH checkpoint.storage=<that copy>`, from
          process start to the `time` of its first metrics record; its process tree is then
          killed;
  save  = the Spillway migration's save of the same index (both must checkpoint);
  total = save + copy + start.

Prints each migration and baseline repeat, the medians of every part, the ratios
spillway/baseline, and the machine. The fleet is always brought down (`spillway fleet down`),
any process of the run that outlived it killed by PID, and the state dir removed (unless --keep).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import common  # bench/common.py (this directory is on sys.path; it puts the repo there too)
from common import BenchError, median
from machine import describe

from orchestrator.checkpoint import catalog

JOB_ENDED = {"SUCCEEDED", "FAILED", "CANCELLED"}
ATTEMPT_RUNS = {"RUNNING", "SUBMITTED"}
ATTEMPT_ENDED_BADLY = {"FAILED", "LOST", "STOPPED"}
PARTS = ("total", "save", "copy", "start", "rest")
MODES = {"alternate": "[home]", "partner-to-home": "[partner,home]"}


# ---- following the job through the controller's API -----------------------------------------


class Job:
    """One job, followed through the controller's API; its clusters' stores opened as the
    controller opens them (ClusterView.storage_options from the fleet config)."""

    def __init__(self, home: Path, job_id: str, a: argparse.Namespace) -> None:
        from orchestrator.config import compose_run
        from orchestrator.fleet.fleet import resolve

        self.id, self.a = job_id, a
        self.client = common.api_client(home)
        os.environ["SPILLWAY_HOME"] = str(home)  # what ${state_dir} resolves to
        cfg = compose_run([])
        self.clusters = {v.name: v for v in resolve(cfg.fleet, cfg.state_dir)}

    def status(self) -> dict:
        return self.client.job(self.id)

    def ack(self, attempt: dict) -> dict:
        """The drain acknowledgement of a drained attempt, from its cluster's store."""
        from orchestrator.controller.paths import run_files

        got = run_files(self.clusters[attempt["cluster"]], self.id, attempt["attempt"]).drain_ack()
        if got is None:
            raise BenchError(f"{self.id}: attempt {attempt['attempt']} left no drain ack")
        return got

    def checkpoints(self, cluster: str) -> tuple[str, dict]:
        """(url, storage options) of the job's checkpoints on a cluster."""
        from orchestrator.controller.paths import checkpoints_url

        view = self.clusters[cluster]
        return checkpoints_url(view, self.id), view.storage_options

    def wait_for_step(self, attempt: int, step: int) -> None:
        """Until the job is RUNNING and `attempt`, its newest, has recorded `step` or a later one."""
        deadline = time.monotonic() + self.a.timeout_s
        while True:
            st = self.status()
            if st["state"] in JOB_ENDED:
                raise BenchError(f"{self.id} ended ({st['state']}: {st['reason']}) before {step}")
            newest = st["attempts"][-1]
            last = None
            if newest["attempt"] == attempt and newest["first_step_at"] is not None:
                last = self.client.progress(self.id)["step"]
                if st["state"] == "RUNNING" and last is not None and last >= step:
                    return
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.id}: attempt {attempt} at step {last}, not {step}, in time"
                )
            time.sleep(self.a.poll_s)

    def migrate(self, to: str) -> dict:
        """One `spillway migrate`, followed until the next attempt's first step; its parts."""
        a = self.a
        st = self.status()
        prev = st["attempts"][-1]
        if st["state"] != "RUNNING" or prev["state"] != "RUNNING":
            raise BenchError(
                f"{self.id} is {st['state']} (attempt {prev['attempt']} {prev['state']})"
            )
        asked = time.time()
        common.spillway(a.env, "migrate", self.id, "--to", to)
        deadline = time.monotonic() + a.timeout_s
        while True:
            time.sleep(a.poll_s)
            st = self.status()
            after = [x for x in st["attempts"] if x["attempt"] > prev["attempt"]]
            if after and after[-1]["first_step_at"] is not None:
                break
            if st["state"] in JOB_ENDED:
                raise BenchError(f"{self.id} ended ({st['state']}: {st['reason']}) while migrating")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.id}: no first step on {to} within {a.timeout_s} s")
        prev = next(x for x in st["attempts"] if x["attempt"] == prev["attempt"])
        nxt = after[-1]
        ack = self.ack(prev)
        return parts_of(prev, nxt, after, ack, to, asked)


def parts_of(prev: dict, nxt: dict, after: list[dict], ack: dict, to: str, asked: float) -> dict:
    """The parts of one migration from the two attempts' records and the drain ack, and what
    about it looks wrong."""
    for key, got in (("interrupted_at", prev), ("submitted_at", nxt), ("copy_s", nxt)):
        if got[key] is None:
            raise BenchError(f"attempt {got['attempt']} has no {key}: {got}")
    odd = []
    if len(after) != 1 or any(x["state"] in ATTEMPT_ENDED_BADLY for x in after):
        odd.append(
            "attempts after the drain: " + ", ".join(f"{x['attempt']} {x['state']}" for x in after)
        )
    if nxt["cluster"] != to:
        odd.append(f"the new attempt runs on {nxt['cluster']}, not {to}")
    if ack["step"] != nxt["copy_step"]:
        odd.append(f"drained at step {ack['step']} but copied step {nxt['copy_step']}")
    if nxt["first_step"] != (nxt["copy_step"] or 0) + 1:
        odd.append(f"first step {nxt['first_step']} after copied step {nxt['copy_step']}")
    total = nxt["first_step_at"] - prev["interrupted_at"]
    if nxt["resume_s"] is not None and abs(nxt["resume_s"] - total) > 1e-6:
        odd.append(f"status resume_s {nxt['resume_s']:.3f} s differs from the total")
    # The controller stamps an attempt with its tick's clock: a copy that ends within the tick
    # that placed the attempt leaves submitted_at == created_at, before the copy. The submit
    # cannot have come before the copy was done.
    handed = max(nxt["submitted_at"], nxt["created_at"] + nxt["copy_s"])
    parts = {
        "total": total,
        "save": ack["at"] - prev["interrupted_at"],
        "copy": nxt["copy_s"],
        "start": nxt["first_step_at"] - handed,
    }
    parts["rest"] = parts["total"] - parts["save"] - parts["copy"] - parts["start"]
    ended = prev["ended_at"] or ack["at"]
    return {
        "parts": parts,
        "prev": prev,
        "next": nxt,
        "ack": ack,
        "request_s": prev["interrupted_at"] - asked,  # the migrate command to the DRAIN file
        # Where rest and start went, by the controller's ticks (about 1 s apart):
        "exit_s": ended - ack["at"],  # ack to the drained end seen
        "place_s": nxt["created_at"] - ended,  # to the new attempt
        "submit_s": handed - nxt["created_at"] - nxt["copy_s"],  # copy done to submit
        "running_s": (nxt["started_at"] or handed) - handed,
        "odd": odd,
    }


def print_migration(label: str, m: dict) -> None:
    p, prev, nxt = m["parts"], m["prev"], m["next"]
    print(
        f"  {label}: {prev['cluster']} -> {nxt['cluster']} (attempt {prev['attempt']} -> "
        f"{nxt['attempt']}, world {prev['world_size']} -> {nxt['world_size']}), drained at step "
        f"{m['ack']['step']}, copied step {nxt['copy_step']} "
        f"({nxt['copy_bytes_done'] / 1e6:.2f} MB): total {p['total']:.2f} s = save "
        f"{p['save']:.3f} + copy {p['copy']:.3f} + start {p['start']:.2f} + rest "
        f"{p['rest']:.2f} s [migrate command to drain request {m['request_s']:.2f} s, not in total]"
    )
    print(
        f"    rest: ack to the drained attempt's end seen {m['exit_s']:.2f} s, to the new attempt "
        f"{m['place_s']:.2f} s, copy done to submit {m['submit_s']:.2f} s; start: Ray job RUNNING "
        f"seen after {m['running_s']:.2f} s, first step {p['start'] - m['running_s']:.2f} s later"
    )
    for line in m["odd"]:
        print(f"    odd: {line}")


# ---- the baseline: by hand ------------------------------------------------------------------


def torchrun_to_first_step(
    a: argparse.Namespace, overrides: list[str], run_dir: Path, storage: Path
) -> tuple[float, dict, list[str]]:
    """Seconds from starting a cold torchrun until the end of its first step (its first
    metrics record's `time`), the record, and the command; the torchrun is then killed."""
    cmd = common.torchrun(a.nproc, "-m", "recipes.gpt.train", *overrides)
    cmd += [f"resources.devices={a.nproc}", f"run_dir={run_dir}", f"checkpoint.storage={storage}"]
    log = run_dir.with_suffix(".log")
    with log.open("wb") as out:
        began = time.time()
        proc = subprocess.Popen(
            cmd, cwd=common.REPO, env=a.env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            first = common.first_record(proc, run_dir, log, a.timeout_s)
        finally:
            if proc.poll() is None:
                common.kill_tree(proc)
    return first["time"] - began, first, cmd


def by_hand(a: argparse.Namespace, job: Job, measured: list[dict], overrides: list[str]) -> list:
    """The same moves by hand: a plain copy of the last measured migration's checkpoint from
    the store it left to local disk, and a cold torchrun resuming from that copy."""
    last = measured[-1]
    step, left = last["next"]["copy_step"], last["prev"]["cluster"]
    src, options = job.checkpoints(left)
    scratch = a.root / "by-hand"
    scratch.mkdir()
    base = []
    for r in range(a.repeats):
        dst = scratch / f"ckpt-{r}"
        copy_s = common.plain_copy(src, str(dst), step, src_options=options)
        # The plain copy lands in step-N.tmp/; a person's copy is their checkpoint: name it so.
        os.rename(catalog.tmp_dir(str(dst), step), catalog.step_dir(str(dst), step))
        start_s, first, cmd = torchrun_to_first_step(a, overrides, scratch / f"run-{r}", dst)
        if first["step"] != step + 1:
            print(f"    odd: torchrun's first step is {first['step']}, not {step + 1}")
        save_s = measured[r % len(measured)]["parts"]["save"]
        base.append(
            {"total": save_s + copy_s + start_s, "save": save_s, "copy": copy_s,
             "start": start_s, "rest": None}
        )  # fmt: skip
        print(
            f"  by hand {r + 1}: plain copy of step {step} from {left} ({src}) to disk "
            f"{copy_s:.3f} s, torchrun to first step {start_s:.2f} s (world "
            f"{first['world_size']}, step {first['step']})"
        )
        if r == 0:
            print("torchrun command:", common.show(cmd))
    return base


# ---- the driver -----------------------------------------------------------------------------


def _row(name: str, values: dict) -> str:
    cells = "".join(
        f"{values[p]:>9.3f}" if values.get(p) is not None else f"{'-':>9}" for p in PARTS
    )
    return f"  {name:<22}{cells}"


def migrations(a: argparse.Namespace, job: Job) -> list[dict]:
    """The measured migrations (and, in partner-to-home, the return trips between them)."""
    measured = []
    for r in range(a.repeats):
        if r:
            cur = job.status()["attempts"][-1]
            job.wait_for_step(cur["attempt"], cur["first_step"] + a.settle_steps)
        if a.mode == "alternate":
            to = "partner" if r % 2 == 0 else "home"
        else:
            to = "home"
            if r:  # back to the partner first, so that the measured move leaves its bucket
                back = job.migrate("partner")
                print_migration(f"return trip {r}", back)
                cur = back["next"]
                job.wait_for_step(cur["attempt"], cur["first_step"] + a.settle_steps)
        m = job.migrate(to)
        measured.append(m)
        print_migration(f"migration {r + 1}", m)
    return measured


def driver(a: argparse.Namespace, root: Path) -> None:
    a.root = root
    a.env = common.bench_env(root, omp_threads=1, tmpdir=root / "tmp")  # as torchrun and Ray set
    overrides = [
        f"model={a.model}",
        "data=synthetic",
        f"data.seq_len={a.seq_len}",
        f"checkpoint.every_steps={a.every_steps}",
        f"trainer.max_steps={a.max_steps}",
        common.FAST_METRICS,
        "run_name=bench",
        f"placement.clusters={MODES[a.mode]}",
    ]
    print(describe())
    print(
        f"drain_to_first_step: mode={a.mode} model={a.model} seq_len={a.seq_len} every_steps="
        f"{a.every_steps} max_steps={a.max_steps} start_step={a.start_step} settle_steps="
        f"{a.settle_steps} repeats={a.repeats} poll={a.poll_s:g} s; SPILLWAY_HOME={root}"
    )
    job = None
    try:
        began = time.monotonic()
        common.spillway(a.env, "fleet", "up", timeout_s=600)
        print(f"fleet up: {time.monotonic() - began:.1f} s")
        began = time.monotonic()
        launched = common.spillway(a.env, "launch", *overrides, "--json", timeout_s=900)
        job = Job(root, json.loads(launched)["job_id"], a)
        print(f"launch (controller start included): {time.monotonic() - began:.1f} s")
        print("spillway command: spillway launch " + " ".join(overrides) + " --json")
        job.wait_for_step(1, a.start_step)
        measured = migrations(a, job)

        common.spillway(a.env, "cancel", job.id)
        deadline = time.monotonic() + a.timeout_s
        while any(x["state"] in ATTEMPT_RUNS for x in job.status()["attempts"]):
            if time.monotonic() > deadline:
                raise BenchError(f"{job.id}: an attempt still runs {a.timeout_s} s after cancel")
            time.sleep(a.poll_s)
        base = by_hand(a, job, measured, overrides)
    except BaseException:
        if job is not None:
            try:
                print(common.spillway(a.env, "status", job.id, timeout_s=60))
            except BenchError as exc:  # the status is only a diagnostic here
                print(f"(no status: {exc})")
        raise
    finally:
        common.fleet_down(a.env)
        common.kill_leftovers(root, "`spillway fleet down`")

    spill = {p: median(m["parts"][p] for m in measured) for p in PARTS}
    hand = {p: median(b[p] for b in base) for p in PARTS if p != "rest"}
    route = ", ".join(
        sorted({f"{m['prev']['cluster']} -> {m['next']['cluster']}" for m in measured})
    )
    print(f"medians over {len(measured)} migration(s) ({route}) and {len(base)} by-hand repeat(s):")
    print(f"  {'seconds':<22}" + "".join(f"{p:>9}" for p in PARTS))
    print(_row("spillway", spill))
    print(_row("by hand (baseline)", hand))
    ratios = ", ".join(f"{p} {spill[p] / hand[p]:.2f}" for p in PARTS if hand.get(p))
    print(
        f"ratio spillway/baseline: {ratios} (total +{spill['total'] - hand['total']:.2f} s; "
        f"the baseline has no controller latency, and its save is Spillway's)"
    )
    per_s = common.listing(m["parts"]["total"] for m in measured)
    per_b = common.listing(b["total"] for b in base)
    print(f"  per run total: spillway {per_s} s; by hand {per_b} s")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--mode",
        choices=tuple(MODES),
        default="partner-to-home",
        help="which migrations are measured (partner-to-home: the by-hand baseline makes the "
        "same move; alternate: its home -> partner moves are held against a move home)",
    )
    p.add_argument("--model", choices=("tiny", "small"), default="tiny")
    p.add_argument("--max-steps", type=int, default=2000, help="trainer.max_steps of the job")
    p.add_argument("--start-step", type=int, default=30, help="first migration after this step")
    p.add_argument(
        "--settle-steps", type=int, default=10, help="steps a new attempt trains before the next"
    )
    p.add_argument("--repeats", type=int, default=3, help="measured migrations")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--every-steps", type=int, default=10, help="checkpoint.every_steps")
    p.add_argument("--nproc", type=int, default=2, help="torchrun ranks of the baseline")
    p.add_argument("--poll-s", type=float, default=0.5, help="controller API polling interval")
    p.add_argument("--timeout-s", type=int, default=600, help="per wait")
    p.add_argument("--keep", action="store_true", help="keep the state dir, runs and logs")
    a = p.parse_args()
    if a.repeats < 1:
        p.error("--repeats must be >= 1")
    with common.state_dir("sw-", a.keep, short=True) as root:
        driver(a, root)


if __name__ == "__main__":
    common.run_main(main)
