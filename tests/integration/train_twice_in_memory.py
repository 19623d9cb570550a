"""Train, stop and resume inside one process with checkpoints on fsspec's memory:// store.

Run as a script by test_storage.py: a memory:// store lives only as long as its process, and
nothing about it is a local path, so a resume from it shows the checkpoint code never assumes one.
"""

from __future__ import annotations

import json
import sys

import fsspec

from orchestrator.config import compose_run
from orchestrator.rundir import RunDir
from recipes.gpt.train import train

run_dir = sys.argv[1]
common = [
    "data=synthetic",
    "data.seq_len=32",
    "trainer.max_steps=8",
    "trainer.global_batch_size=4",
    "checkpoint.every_steps=2",
    "checkpoint.storage=memory://spillway-test/ckpt",
    f"run_dir={run_dir}",
]
train(compose_run([*common, "trainer.stop_at_step=4"]))
listing = sorted(
    p.rsplit("/", 1)[-1]
    for p in fsspec.filesystem("memory").ls("/spillway-test/ckpt", detail=False)
)
train(compose_run(common))
print(
    json.dumps({"listing": listing, "steps": [r["step"] for r in RunDir(run_dir).read_metrics()]})
)
