"""The recipe's meta-device build gives exactly today's initial weights on any world size.

Exact resume and cross-world-size continuation compare losses bit for bit against runs on
other world sizes, so the initial weights must not depend on how they were sharded. 3 ranks
shard the tiny model's 64- and 256-row parameters unevenly (FSDP2 pads the last shard).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from recipes.gpt.model import ModelArgs, Transformer
from tests.integration.recipe_runs import REPO

pytestmark = pytest.mark.slow

SEED = 1234


@pytest.mark.parametrize("nproc", [1, 2, 3])
def test_meta_init_matches_unsharded_init(tmp_path, nproc: int) -> None:
    reference = Transformer(ModelArgs())
    reference.init_weights(seed=SEED)
    ref_file = tmp_path / "reference.pt"
    torch.save(dict(reference.named_parameters()), ref_file)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(REPO / "tests" / "integration" / "meta_init_ranks.py"), str(ref_file), str(SEED),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"meta init matches on {nproc} rank(s)" in done.stdout
