"""Inside a local cluster's mount namespace: carry out its mount plan, then start its raylets.

    unshare --mount --propagation private python -m orchestrator.fleet.namespace PLAN_JSON

PLAN_JSON is {"mounts": [steps of isolation.mount_plan], "commands": [argv, ...],
"timeout_s": seconds for each command}. Without unshare (a machine that refuses namespaces)
the mounts are empty and only the commands run. Standard library only, imported before any
mount: once the plan has run, Spillway's own sources may be hidden from this process too.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
TMPFS_OPTIONS = "size=1m,mode=0755"

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None):
    def enc(s: str | None) -> bytes | None:
        return None if s is None else s.encode()

    if _libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or 'bind'} on {target}: {os.strerror(err)}")


def apply_mounts(steps: list[dict[str, str]]) -> None:
    held: dict[str, int] = {}
    try:
        for step in steps:
            op, path = step["op"], step["path"]
            if op == "hold":
                # The kept directory is reached later through this descriptor, once a tmpfs
                # covers its path: /proc/self/fd/N still names the directory itself.
                held[path] = os.open(path, os.O_PATH | os.O_DIRECTORY)
            elif op == "tmpfs":
                os.makedirs(path, exist_ok=True)  # a hidden dir made later would be visible
                _mount("tmpfs", path, "tmpfs", 0, TMPFS_OPTIONS)
            elif op == "bind":
                os.makedirs(path, exist_ok=True)
                _mount(f"/proc/self/fd/{held[path]}", path, None, MS_BIND | MS_REC, None)
            elif op == "seal":
                _mount(None, path, "tmpfs", MS_REMOUNT | MS_RDONLY, TMPFS_OPTIONS)
            else:
                raise ValueError(f"unknown mount step {op!r}")
    finally:
        for fd in held.values():
            os.close(fd)


def main(argv: list[str]) -> int:
    plan = json.loads(argv[1])
    try:
        apply_mounts(plan["mounts"])
    except OSError as exc:
        print(f"spillway: isolating the cluster failed: {exc}", file=sys.stderr)
        return 3
    for cmd in plan["commands"]:
        try:
            code = subprocess.run(cmd, timeout=plan["timeout_s"]).returncode
        except subprocess.TimeoutExpired:
            print(f"spillway: {' '.join(cmd)} took over {plan['timeout_s']}s", file=sys.stderr)
            return 124
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
