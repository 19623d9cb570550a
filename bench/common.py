"""What the benchmark scripts share: their temp state dirs, the environment and the commands of
the processes they start, bounded runs of those, metrics reading, medians, stopping every
process they started (by PID), and a local S3 server of their own.

Each script runs as `python bench/NAME.py`, so this directory is first on sys.path and `import
common` finds this file; importing it also puts the repository root there, so `orchestrator` and
`recipes` import from this checkout even without an install.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from orchestrator.fleet.s3server import S3Server

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Rank 0 flushes its metrics segment at least this often (default 2 s), so a poll of the run
# dir sees a step soon after it ends; latencies come from each record's own `time`.
FAST_METRICS = "logger.metrics_flush_s=0.1"
# Ray's unix socket paths under a state dir must stay within 107 bytes, and the longest
# (ROOT/ray/partner/session_<date>_<time>_<us>_<pid>/sockets/dash_MetricsHead) takes about 80.
SHORT_DIR_LIMIT = 12
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A benchmark cannot go on; the message says why (run_main prints it, exit status 1)."""


def run_main(main: Callable[[], None]) -> None:
    """Run a script's main; a BenchError ends it with one message and exit status 1."""
    try:
        main()
    except BenchError as exc:
        sys.exit(f"{Path(sys.argv[0]).stem}: {exc}")


# ---- commands and their environment ---------------------------------------------------------


def _tool(name: str, module: str) -> list[str]:
    """The console script of this interpreter (not a shim in front of it), else `python -m`."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


SPILLWAY = _tool("spillway", "orchestrator.cli")
TORCHRUN = _tool("torchrun", "torch.distributed.run")


def torchrun(nproc: int, *args: str) -> list[str]:
    """`torchrun --standalone --nproc_per_node=N ARGS...`: one node, ranks on this machine."""
    return [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *args]


def show(cmd: Sequence[str]) -> str:
    """A command as a person would type it: console scripts by their name."""
    words = list(cmd)
    for tool, name in ((TORCHRUN, "torchrun"), (SPILLWAY, "spillway")):
        if words[: len(tool)] == tool:
            words = [name, *words[len(tool) :]]
    return " ".join(words)


def threads_per_rank(nproc: int) -> int:
    """OMP threads for each of nproc ranks sharing this machine's cores (the caller's setting wins)."""
    return int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // nproc))


def bench_env(home: Path, *, omp_threads: int, tmpdir: Path | None = None) -> dict[str, str]:
    """The environment of every process a benchmark starts: its own SPILLWAY_HOME (and TMPDIR),
    this checkout importable, and a fixed OMP thread count."""
    env = dict(os.environ, SPILLWAY_HOME=str(home), OMP_NUM_THREADS=str(omp_threads))
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


@contextlib.contextmanager
def state_dir(prefix: str, keep: bool, *, short: bool = False) -> Iterator[Path]:
    """A fresh temp dir with an empty tmp/ inside (for TMPDIR), removed at the end unless keep.

    `short`: under /tmp when $TMPDIR's path is too long for the Ray socket paths inside it."""
    base = tempfile.gettempdir()
    if short and len(base) > SHORT_DIR_LIMIT:
        base = "/tmp"
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    (root / "tmp").mkdir()
    try:
        yield root
    finally:
        if keep:
            print(f"kept the state dir, runs and logs under {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def tail(log: Path, chars: int = 4000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def run_logged(cmd: Sequence[str], env: dict[str, str], log: Path, timeout_s: float) -> None:
    """Run cmd from the repo root with its output in log, to its end; BenchError with the log's
    tail if it fails or is still running after timeout_s (its whole process tree is killed)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            raise BenchError(
                f"still running after {timeout_s:.0f} s, killed: {show(cmd)}\n{tail(log)}"
            ) from None
        except BaseException:
            kill_tree(proc)
            raise
    if code != 0:
        raise BenchError(f"command failed (exit {code}): {show(cmd)}\n{tail(log)}")


def spillway(env: dict[str, str], *args: str, timeout_s: float = 300) -> str:
    """The stdout of one `spillway` command; BenchError with its output if it fails."""
    try:
        done = subprocess.run(
            [*SPILLWAY, *args], cwd=REPO, env=env, capture_output=True, text=True,
            timeout=timeout_s,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise BenchError(f"spillway {' '.join(args)}: no answer within {timeout_s:.0f} s") from None
    if done.returncode != 0:
        raise BenchError(
            f"spillway {' '.join(args)} failed (exit {done.returncode}):\n"
            f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        )
    return done.stdout


def fleet_down(env: dict[str, str]) -> None:
    """`spillway fleet down` for the benchmark's own state dir; prints what it stopped."""
    try:
        out = spillway(env, "fleet", "down", timeout_s=180)
    except BenchError as exc:  # the caller still looks for leftovers itself
        print(f"fleet down: {exc}")
        return
    print("fleet down:", " / ".join(out.strip().splitlines()))


def api_client(home: Path) -> Any:
    """The controller's API client, found as `spillway` finds it (client.json in the state
    dir, written by `fleet up` and `launch`): polling it from the benchmark's own process adds
    no CLI start-up to the machine's load."""
    from orchestrator.api.client import ApiClient
    from orchestrator.api.discovery import read_client_file

    endpoint = read_client_file(str(home))
    if endpoint is None:
        raise BenchError(f"no client.json in {home}: `spillway fleet up` should have written it")
    return ApiClient(endpoint)


# ---- metrics --------------------------------------------------------------------------------


def read_metrics(run_dir: str | Path, storage_options: dict[str, Any] | None = None) -> list[dict]:
    """Every metrics record of one run dir (its segments), on any store."""
    from orchestrator.rundir import RunDir

    return RunDir(str(run_dir), storage_options).read_metrics()


def check_steps(records: Sequence[dict], steps: int, world: int, where: str) -> None:
    """BenchError unless records are steps 1..steps, each at world size `world`."""
    if [x["step"] for x in records] != list(range(1, steps + 1)) or any(
        x["world_size"] != world for x in records
    ):
        got = f"{len(records)} records, world sizes {sorted({x['world_size'] for x in records})}"
        raise BenchError(f"{where}: metrics are not steps 1..{steps} at world size {world} ({got})")


def periods(records: Sequence[dict]) -> list[float]:
    """Wall seconds between consecutive records' `time` (the end of each step): the period of
    the loop, which also counts what the recipe does outside its timed step."""
    return [b["time"] - a["time"] for a, b in zip(records, records[1:], strict=False)]


def first_record(
    proc: subprocess.Popen, run_dir: Path, log: Path, timeout_s: float, poll_s: float = 0.02
) -> dict:
    """The first metrics record of a run that proc is training; BenchError if it exits or
    outlives timeout_s first."""
    from orchestrator.rundir import RunDir

    files = RunDir(str(run_dir))
    deadline = time.monotonic() + timeout_s
    while True:
        got = files.read_metrics()
        if got:
            return got[0]
        if proc.poll() is not None:
            raise BenchError(f"exited ({proc.returncode}) before its first step:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise BenchError(f"no first step in {run_dir} within {timeout_s:.0f} s")
        time.sleep(poll_s)


# ---- figures --------------------------------------------------------------------------------

median = statistics.median


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def span(values: Iterable[float], fmt: str = "{:.3f}") -> str:
    """'min..max' of values."""
    vals = list(values)
    return f"{fmt.format(min(vals))}..{fmt.format(max(vals))}"


def listing(values: Iterable[float], fmt: str = "{:.2f}") -> str:
    """The values one by one, 'a, b, c'."""
    return ", ".join(fmt.format(v) for v in values)


# ---- processes ------------------------------------------------------------------------------


class ProcStat(NamedTuple):
    """What a benchmark reads of one process's /proc/PID/stat."""

    name: bytes  # the command name, e.g. b"ray::RankActor"
    ppid: int
    session: int
    cpu_ticks: int  # utime + stime, in clock ticks
    nice: int
    start: int  # start time after boot, in clock ticks: with the PID, names the process


def proc_stats() -> dict[int, ProcStat]:
    """Every live process that is not a zombie, by PID."""
    stats = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                head, tail_ = f.read().rsplit(b")", 1)
        except (OSError, ValueError):
            continue
        fields = tail_.split()
        if fields[0] == b"Z":
            continue
        stats[int(entry.name)] = ProcStat(
            name=head.split(b"(", 1)[-1],
            ppid=int(fields[1]),
            session=int(fields[3]),
            cpu_ticks=int(fields[11]) + int(fields[12]),
            nice=int(fields[16]),
            start=int(fields[19]),
        )
    return stats


def process_tree(roots: Iterable[int], stats: dict[int, ProcStat] | None = None) -> list[int]:
    """The roots and every live descendant of them."""
    stats = proc_stats() if stats is None else stats
    kids: dict[int, list[int]] = {}
    for pid, st in stats.items():
        kids.setdefault(st.ppid, []).append(pid)
    out, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.append(pid)
            todo += kids.get(pid, [])
    return out


class SessionCpu:
    """CPU seconds the processes of some sessions, and their descendants, used since this
    object was made: for processes a benchmark did not start as its own waited-for children
    (a Ray cluster, an S3 server), whose CPU CpuWatch would count as other processes'.

    A process's CPU is read from /proc at each sample() and kept per process, because one that
    ends unreaped (a Ray worker killed at the end of its job) takes its CPU time with it. What
    a process used after its last sample is missed: sample about once a second."""

    def __init__(self, sessions: Iterable[int]) -> None:
        self.sessions = set(sessions)
        self.base = self._scan()
        self.seen = dict(self.base)

    def _scan(self) -> dict[tuple[int, int], int]:
        """{(pid, start time): cpu ticks} of the sessions' processes now."""
        stats = proc_stats()
        self.last = stats  # the whole scan, for a caller that looks at the processes too
        roots = [pid for pid, st in stats.items() if st.session in self.sessions]
        return {
            (pid, stats[pid].start): stats[pid].cpu_ticks
            for pid in process_tree(roots, stats)
            if pid in stats
        }

    def sample(self) -> None:
        for key, ticks in self._scan().items():
            self.seen[key] = max(self.seen.get(key, 0), ticks)

    def total_s(self) -> float:
        self.sample()
        return sum(t - self.base.get(k, 0) for k, t in self.seen.items()) / CLOCK_TICKS


def signal_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL proc, its process group and every descendant of it, then reap it.

    torchrun starts each rank in a session of its own (torch.distributed.elastic's
    SubprocessHandler: start_new_session=True), so the group alone would leave the ranks
    running. The tree is frozen first so that nothing forks or is reparented meanwhile."""
    pids = process_tree([proc.pid])
    signal_pids(pids, signal.SIGSTOP)
    pids = list(dict.fromkeys(pids + process_tree([proc.pid])))
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    signal_pids(pids, signal.SIGKILL)
    proc.wait(timeout=60)


def leftovers(root: Path) -> list[tuple[int, str]]:
    """Live processes that carry the state dir root in their environment or command line."""
    # A path below root, or root as the state dir: not another dir whose name starts alike.
    mark, env_mark = f"{root}/".encode(), f"SPILLWAY_HOME={root}\0".encode()
    found = []
    for pid in proc_stats():
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read() + b"\0"
        except OSError:
            continue
        if mark in cmdline or env_mark in environ:
            found.append((pid, cmdline.replace(b"\0", b" ").decode(errors="replace")))
    return found


def kill_leftovers(root: Path, what: str) -> None:
    """SIGKILL, by PID, each process of this run that outlived `what`, saying which."""
    left = leftovers(root)
    if not left:
        return
    print(f"WARNING: {len(left)} process(es) of this run outlived {what}:")
    for pid, cmdline in left:
        print(f"  {pid}: {cmdline[:200]}")
    signal_pids([pid for pid, _ in left], signal.SIGKILL)
    print("  killed them (SIGKILL, by PID)")


# ---- a local S3 server ----------------------------------------------------------------------


@contextlib.contextmanager
def local_s3(root: Path, bucket: str) -> Iterator[S3Server]:
    """An S3 server on 127.0.0.1 for this benchmark alone (moto's server mode, as `fleet up`
    starts it): its own process in its own session, the bucket made, stopped by its PIDs at
    the end. Its storage_options() open it (endpoint and fresh keys)."""
    from orchestrator.fleet.environment import base_env
    from orchestrator.fleet.local import free_ports
    from orchestrator.fleet.s3server import ensure_buckets, start_s3_server, stop_s3_server

    env = {**base_env(os.environ), "TMPDIR": str(root / "tmp")}
    server = start_s3_server(root, free_ports(1)[0], env)
    try:
        ensure_buckets(server, [bucket])
        yield server
    finally:
        stop_s3_server(server)
        if server.is_running():
            print(f"WARNING: the S3 server (session {server.session_id}) did not stop")


# ---- the plain-copy baseline ---------------------------------------------------------------


def plain_copy(
    src_url: str,
    dst_url: str,
    step: int,
    src_options: dict[str, Any] | None = None,
    dst_options: dict[str, Any] | None = None,
) -> float:
    """Seconds to copy the files of committed ``step`` with no hashing or checks: the baseline
    the verified copy (orchestrator.checkpoint.transfer.copy_checkpoint) is measured against.

    Uses the filesystems' own copy: ``cp_file`` within one filesystem (``shutil.copyfile`` on
    local disk, a server-side copy on object stores), ``put_file``/``get_file`` between local
    disk and another filesystem, a plain stream otherwise. The files land in the target's
    ``step-N.tmp/``, uncommitted; the caller deletes them.
    """
    import json

    from orchestrator.checkpoint import catalog
    from orchestrator.checkpoint.manifest import MANIFEST_NAME
    from orchestrator.checkpoint.storage import join, open_root, remove_tree

    fs_src, src_root = open_root(src_url, src_options)
    fs_dst, dst_root = open_root(dst_url, dst_options)
    src_dir = catalog.step_dir(src_root, step)
    with fs_src.open(join(src_dir, MANIFEST_NAME), "rb") as f:
        rels = [e["path"] for e in json.loads(f.read())["files"]] + [MANIFEST_NAME]
    tmp = catalog.tmp_dir(dst_root, step)  # a name no store lists as a checkpoint
    remove_tree(fs_dst, tmp)

    def is_local(fs: Any) -> bool:
        return "file" in fs.protocol or "local" in fs.protocol

    began = time.perf_counter()
    for rel in rels:
        src, dst = join(src_dir, rel), join(tmp, rel)
        fs_dst.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
        if fs_src is fs_dst:
            fs_src.cp_file(src, dst)
        elif is_local(fs_src):
            fs_dst.put_file(src, dst)
        elif is_local(fs_dst):
            fs_src.get_file(src, dst)
        else:
            with fs_src.open(src, "rb") as fin, fs_dst.open(dst, "wb") as fout:
                while chunk := fin.read(8 << 20):
                    fout.write(chunk)
    return time.perf_counter() - began


# ---- the bare baselines' loop --------------------------------------------------------------


def bare_train_step(model: Any, optimizer: Any, chunks: Sequence[Any], clip: float = 0.0) -> None:
    """One plain FSDP2 training step over micro-batches of token rows: forward, cross-entropy,
    backward (gradients synced on the last micro-batch only), optimizer step. Nothing else:
    what the bare baselines time against the recipe. clip > 0: torch's own
    clip_grad_norm_ to that norm before the step (on DTensor gradients, as torchtitan's loop
    does), the same math the recipe's default optim.grad_clip asks for."""
    import torch
    import torch.nn.functional as F

    for i, chunk in enumerate(chunks):
        model.set_requires_gradient_sync(i == len(chunks) - 1)
        logits = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten())
        (loss / len(chunks)).backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ---- configs --------------------------------------------------------------------------------


def conf_yaml(group: str, name: str) -> dict[str, Any]:
    """One file of Spillway's config groups (orchestrator/conf/GROUP/NAME.yaml), as a dict."""
    import yaml

    return yaml.safe_load((REPO / "orchestrator" / "conf" / group / f"{name}.yaml").read_text())
