"""The processes of one local Ray cluster: everything in the session its `ray start` opened.

`ray start` runs in a new session, so the GCS, raylet, dashboard and every worker they spawn
share its session id. Stopping the cluster signals exactly those PIDs: never `ray stop`, which
stops every Ray on the machine.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def session_pids(session_id: int) -> list[int]:
    """PIDs of live processes whose session is session_id."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state ppid pgrp session ...
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[3]) == session_id:
            pids.append(int(entry.name))
    return sorted(pids)


def stop_session(session_id: int, grace_s: float = 3.0) -> list[int]:
    """SIGTERM every process of the session, SIGKILL what is left after grace_s.

    Ray's workers and agents exit on SIGTERM at once; its raylet takes about 10 s and its GCS
    does not exit at all, and neither holds anything a checkpoint needs, so the grace is short.
    """
    stopped = session_pids(session_id)
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in session_pids(session_id):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while session_pids(session_id) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not session_pids(session_id):
            break
    return stopped
