"""The machine a benchmark ran on, as one line for its output (and for docs/benchmarks.md)."""

from __future__ import annotations

import os
import platform
import resource
import time


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 0


def _ram_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return None


def busy_idle_s() -> tuple[float, float] | None:
    """Machine-wide (busy, idle) CPU seconds since boot, from /proc/stat."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    # guest time is already counted in user/nice, so leave it out of the total.
    return (sum(ticks[:8]) - idle) / hz, idle / hz


def _own_cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for descendants, ranks too
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class CpuWatch:
    """How much CPU other processes took while a benchmark ran: timings shared a busy machine?

    Start it before launching the benchmark's subprocesses and call ``report()`` after they
    have all been waited for; "foreign" is machine-wide busy time minus this process tree's.
    """

    def __init__(self) -> None:
        self._wall, self._stat, self._own = time.monotonic(), busy_idle_s(), _own_cpu_s()

    def foreign(self) -> tuple[float, float, float] | None:
        """(cpu-s used by other processes, wall s, share of all cores) since start; None if unknown."""
        wall = time.monotonic() - self._wall
        stat = busy_idle_s()
        if self._stat is None or stat is None or wall <= 0:
            return None
        foreign = max(0.0, stat[0] - self._stat[0] - (_own_cpu_s() - self._own))
        return foreign, wall, foreign / (wall * (usable_cores() or 1))

    def report(self) -> str:
        got = self.foreign()
        if got is None:
            return "cpu use by other processes: unknown (no /proc/stat)"
        foreign, wall, share = got
        return (
            f"cpu use by other processes during the run: {foreign:.1f} cpu-s over {wall:.0f} s "
            f"wall ({share:.0%} of {usable_cores()} cores; 0% means the machine was ours); "
            "load average now " + " ".join(f"{x:.2f}" for x in os.getloadavg())
        )


def describe(with_torch: bool = True) -> str:
    """CPU model, usable cores, RAM, Python and torch versions, and the CUDA device if any.

    `with_torch=False` leaves torch out (and does not import it): for benchmarks of pure code."""
    ram = _ram_gib()
    parts = [
        f"cpu: {_cpu_model()}",
        f"{usable_cores()} cores",
        f"{ram:.0f} GiB RAM" if ram is not None else "RAM unknown",
        f"python {platform.python_version()} ({platform.python_implementation()})",
    ]
    if not with_torch:
        return "machine: " + ", ".join(parts)
    import torch

    parts.append(f"torch {torch.__version__}")
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        name = torch.cuda.get_device_name(0)
        parts.append(f"device: {n} x {name} (CUDA {torch.version.cuda})")
    else:
        parts.append("device: cpu (no CUDA device)")
    return "machine: " + ", ".join(parts)


if __name__ == "__main__":
    print(describe())
