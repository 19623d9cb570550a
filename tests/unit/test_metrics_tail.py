"""Reading the newest record of a metrics.jsonl from its end."""

from __future__ import annotations

import json

from orchestrator.tracking.metrics import MetricsWriter, last_metrics


def test_the_newest_whole_record_is_read_from_the_end(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert last_metrics(path) is None
    writer = MetricsWriter(path)
    for step in range(1, 2001):
        writer.write({"step": step, "loss": 1.0 / step, "checkpoint_s": 0.25})
    writer.close()
    assert last_metrics(path, tail_bytes=256) == {
        "step": 2000,
        "loss": 1 / 2000,
        "checkpoint_s": 0.25,
    }
    with path.open("a") as f:
        f.write(json.dumps({"step": 2001})[:7])  # a line cut short by a crash
    assert last_metrics(path)["step"] == 2000
