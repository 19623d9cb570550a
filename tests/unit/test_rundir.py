"""The run files of an attempt, on a local disk and on an object-like store (memory://)."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from orchestrator import rundir
from orchestrator.checkpoint.storage import remove_tree
from orchestrator.rundir import RunDir


@pytest.fixture(params=["local", "memory"])
def run_files(request, tmp_path):
    if request.param == "local":
        yield RunDir(str(tmp_path / "attempt-1"))
        return
    files = RunDir(f"memory://rundir-test-{uuid.uuid4().hex}/attempt-1")
    try:
        yield files
    finally:
        remove_tree(files.fs, files.path)


def test_nothing_is_there_before_it_is_written(run_files):
    assert run_files.drain_request() is None
    assert run_files.drain_ack() is None
    assert run_files.last_save() is None
    assert run_files.read_metrics() == [] and run_files.last_metrics() is None
    with pytest.raises(FileNotFoundError, match="run_config.json"):
        run_files.read_run_config()


def test_run_config_drain_and_last_save_round_trip(run_files):
    run_files.write_run_config({"trainer": {"max_steps": 3}, "run_dir": run_files.url})
    assert run_files.read_run_config()["trainer"] == {"max_steps": 3}
    run_files.request_drain("lease on partner ends in 20s")
    assert run_files.drain_request() == "lease on partner ends in 20s"
    run_files.acknowledge_drain(12, "SIGTERM")
    ack = run_files.drain_ack()
    assert (ack["step"], ack["reason"]) == (12, "SIGTERM") and ack["at"] > 0
    run_files.record_save(10, 0.25)
    assert {k: run_files.last_save()[k] for k in ("step", "seconds")} == {
        "step": 10,
        "seconds": 0.25,
    }


def test_a_file_cut_short_reads_as_absent_not_as_garbage(run_files):
    run_files.fs.makedirs(run_files.path, exist_ok=True)
    run_files.fs.pipe_file(f"{run_files.path}/{rundir.DRAIN_ACK}", b'{"step": 1')
    assert run_files.drain_ack() is None


def test_metrics_flush_on_the_first_record_then_on_flush_and_close(run_files):
    spool = run_files.metrics_writer(flush_every_s=3600)
    spool.write({"step": 1})
    assert [r["step"] for r in run_files.read_metrics()] == [1]  # the first goes out at once
    spool.write({"step": 2})
    assert run_files.last_metrics() == {"step": 1}  # held in the spool until the next flush
    spool.flush()  # what every checkpoint does
    assert run_files.last_metrics() == {"step": 2}
    spool.write({"step": 3})
    spool.close()
    assert [r["step"] for r in run_files.read_metrics()] == [1, 2, 3]


def test_segments_roll_and_a_new_writer_appends_after_them(run_files, monkeypatch):
    monkeypatch.setattr(rundir, "SEGMENT_BYTES", 64)
    spool = run_files.metrics_writer(flush_every_s=0)
    for step in range(1, 11):
        spool.write({"step": step, "loss": 1.0 / step})
    spool.close()
    assert len(run_files.segments()) > 2
    again = run_files.metrics_writer(flush_every_s=0)  # a rerun in the same run dir
    again.write({"step": 11})
    again.close()
    assert [r["step"] for r in run_files.read_metrics()] == list(range(1, 12))
    assert run_files.last_metrics() == {"step": 11}


def test_a_line_cut_short_by_a_crash_is_left_out(run_files):
    path = f"{run_files.path}/{rundir.segment_name(0)}"
    run_files.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    run_files.fs.pipe_file(path, (json.dumps({"step": 1}) + "\n" + '{"step": 2, "lo').encode())
    assert run_files.read_metrics() == [{"step": 1}]
    assert run_files.last_metrics() == {"step": 1}


def test_the_spool_leaves_nothing_behind(run_files):
    spool = run_files.metrics_writer()
    spool.write({"step": 1})
    spool.close()
    assert not os.path.exists(spool.spool_path)
