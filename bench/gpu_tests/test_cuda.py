"""What only a GPU can show: NCCL, bf16 mixed precision, torch.compile, meta init on CUDA.

Extra to the CPU tests, never instead of them: the same code runs on gloo everywhere else. They
live outside tests/ (the CPU suite never collects them) and bench/gpu_check.sh runs them on a
lent GPU; run by hand without a CUDA device they skip, saying so.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from orchestrator.rundir import RunDir
from recipes.gpt.model import ModelArgs, Transformer
from recipes.gpt.parallel import build_mesh, build_model

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA device (bench/gpu_check.sh runs these on a GPU; "
        "the CPU tests cover the same code on gloo)",
    ),
]

TINY = ModelArgs()
SMALL = ModelArgs(name="small", dim=256, n_layers=4, n_heads=8, n_kv_heads=4,
                  ffn_hidden_dim=704, max_seq_len=512)  # fmt: skip


@pytest.fixture(scope="module")
def nccl(tmp_path_factory) -> Iterator[torch.device]:
    """One NCCL rank on cuda:0 for the whole module (a process group is made once)."""
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    store = tmp_path_factory.mktemp("pg") / f"store-{uuid.uuid4().hex}"
    dist.init_process_group(
        "nccl", init_method=f"file://{store}", rank=0, world_size=1,
        timeout=timedelta(seconds=120), device_id=device,
    )  # fmt: skip
    try:
        yield device
    finally:
        dist.destroy_process_group()


def _tokens(device: torch.device, b: int = 4, t: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, TINY.vocab_size, (b, t + 1), generator=g).to(device)


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def test_nccl_all_reduce(nccl) -> None:
    assert dist.get_backend() == "nccl"
    x = torch.arange(1 << 20, device=nccl, dtype=torch.float32)
    dist.all_reduce(x)
    torch.cuda.synchronize()
    torch.testing.assert_close(x, torch.arange(1 << 20, device=nccl, dtype=torch.float32))


@pytest.mark.parametrize("args", [TINY, SMALL], ids=["tiny", "small"])
def test_meta_init_on_cuda_matches_eager_cuda_init(nccl, args: ModelArgs) -> None:
    with torch.device(nccl):
        eager = Transformer(args)
    eager.init_weights(seed=5)
    sharded = build_model(args, build_mesh("cuda"), nccl, seed=5)
    for (name, pe), ps in zip(eager.named_parameters(), sharded.parameters(), strict=True):
        assert ps.to_local().is_cuda, name
        assert torch.equal(ps.full_tensor(), pe), name
    assert torch.equal(sharded.rope_cos, eager.rope_cos)
    assert torch.equal(sharded.rope_sin, eager.rope_sin)


def test_bf16_mixed_precision_trains_with_fp32_params(nccl) -> None:
    model = build_model(TINY, build_mesh("cuda"), nccl, seed=0, param_dtype="bf16")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = _tokens(nccl)
    assert model(tokens[:, :-1]).dtype == torch.bfloat16
    first = _loss(model, tokens).item()
    for _ in range(10):
        _loss(model, tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the master copy
    assert _loss(model, tokens).item() < 0.9 * first


def test_compiled_blocks_match_eager(nccl) -> None:
    mesh = build_mesh("cuda")
    eager = build_model(TINY, mesh, nccl, seed=1)
    compiled = build_model(TINY, mesh, nccl, seed=1, compile_blocks=True)
    tokens = _tokens(nccl)
    le, lc = _loss(eager, tokens), _loss(compiled, tokens)
    le.backward()
    lc.backward()
    # Inductor fuses and reorders float work: close, not bit-equal.
    torch.testing.assert_close(lc, le, rtol=1e-4, atol=1e-4)
    for (name, pe), pc in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(pc.grad.full_tensor(), pe.grad.full_tensor(),
                                   rtol=1e-3, atol=1e-5, msg=name)  # fmt: skip


def test_recipe_trains_on_cuda_under_torchrun(tmp_path) -> None:
    """The recipe end to end on one GPU: NCCL, meta init, bf16, compiled blocks, a save."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
        "-m", "recipes.gpt.train", "model=tiny", "data=synthetic", "data.seq_len=64",
        "trainer.device=cuda", "trainer.param_dtype=bf16", "trainer.compile=true",
        "trainer.activation_checkpointing=true", "trainer.max_steps=6",
        "trainer.global_batch_size=8", "trainer.micro_batch_size=4", "checkpoint.every_steps=3",
        f"run_dir={run_dir}",
    ]  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    steps = [r["step"] for r in RunDir(str(run_dir)).read_metrics()]
    assert steps == list(range(1, 7))
