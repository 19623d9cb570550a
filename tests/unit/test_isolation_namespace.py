"""The namespace module carries a mount plan out for real, in a private mount namespace.

Root (or a user namespace) is needed, as for the isolated fleet itself; CI runs as root."""

from __future__ import annotations

import json
import subprocess
import sys

from orchestrator.fleet.isolation import mount_plan
from orchestrator.fleet.local import UNSHARE

LOOK = """
import json, os, sys
hidden, kept = sys.argv[1], sys.argv[2]
out = {"hidden": sorted(os.listdir(hidden)), "kept": sorted(os.listdir(kept))}
with open(os.path.join(kept, "written"), "w") as f:
    f.write("from inside")
try:
    open(os.path.join(hidden, "leak"), "w").close()
    out["hidden_write"] = "allowed"
except OSError as exc:
    out["hidden_write"] = exc.strerror
print("LOOK " + json.dumps(out))
"""


def test_hidden_dirs_are_empty_and_read_only_kept_ones_stay_and_nothing_leaks_out(tmp_path):
    hidden, src = tmp_path / "state", tmp_path / "src" / "pkg"
    kept = hidden / "ray" / "partner"
    kept.mkdir(parents=True)
    src.mkdir(parents=True)
    (hidden / "controller.db").write_text("state")
    (kept / "token").write_text("t")
    (src / "__init__.py").write_text("")
    plan = {
        "mounts": mount_plan(hide=[str(hidden), str(src)], keep=[str(kept)]),
        "commands": [
            [sys.executable, "-c", LOOK, str(hidden), str(kept)],
            [
                sys.executable,
                "-c",
                "import os, sys; print('SRC', os.listdir(sys.argv[1]))",
                str(src),
            ],
        ],
        "timeout_s": 30,
    }
    done = subprocess.run(
        [*UNSHARE, sys.executable, "-m", "orchestrator.fleet.namespace", json.dumps(plan)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    look = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("LOOK "))[5:])
    assert look["hidden"] == ["ray"]  # only the way down to the kept dir
    assert look["kept"] == ["token"]
    assert look["hidden_write"] == "Read-only file system"
    assert "SRC []" in done.stdout
    # Outside the namespace nothing was covered, and the write into the kept dir is real.
    assert (hidden / "controller.db").read_text() == "state"
    assert (src / "__init__.py").exists()
    assert (kept / "written").read_text() == "from inside"
    assert not (hidden / "leak").exists()


def test_a_failing_command_fails_the_start_with_its_exit_status():
    plan = {
        "mounts": [],
        "commands": [[sys.executable, "-c", "raise SystemExit(7)"]],
        "timeout_s": 30,
    }
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.fleet.namespace", json.dumps(plan)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 7


def test_a_plan_that_cannot_be_carried_out_is_one_line_and_no_command_runs(tmp_path):
    marker, a_file = tmp_path / "ran", tmp_path / "a-file"
    a_file.write_text("not a directory")
    plan = {
        "mounts": [{"op": "tmpfs", "path": str(a_file)}],
        "commands": [[sys.executable, "-c", f"open({str(marker)!r}, 'w')"]],
        "timeout_s": 30,
    }
    done = subprocess.run(
        [*UNSHARE, sys.executable, "-m", "orchestrator.fleet.namespace", json.dumps(plan)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 3
    assert done.stderr.strip().startswith("spillway: isolating the cluster failed:")
    assert len(done.stderr.strip().splitlines()) == 1
    assert not marker.exists()
