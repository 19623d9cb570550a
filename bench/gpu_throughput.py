"""Tokens/s and MFU of the GPT recipe on one GPU (model=1b, bf16, compiled, activation
checkpointing) against a bare compiled bf16 FSDP2 loop of the same model. Needs CUDA.

    python bench/gpu_throughput.py                      # 40 steps, 10 warmup, batch 16 x 2048
    python bench/gpu_throughput.py --steps 60 --micro-batch 2

Recipe side: `torchrun --standalone --nproc_per_node=1 -m recipes.gpt.train model=1b
data=synthetic data.vocab_size=128256 data.seq_len=2048 data.dtype=uint32 trainer.device=cuda
trainer.param_dtype=bf16 trainer.compile=true trainer.activation_checkpointing=true ...`; its
figures are the median `tokens_per_s` and `mfu` of its metrics after the warmup steps. Only the
final step is checkpointed (the recipe always saves its last step; that save is outside the timed
steps but takes a while for a ~1.5B-parameter model with AdamW state).

Bare side: this file under torchrun with --bare: the same Transformer, fully_shard per block +
root with the same bf16/fp32-reduce MixedPrecisionPolicy, every block compiled, activation
checkpointing on, AdamW, the same global and micro batch; one fixed batch on the GPU, a CUDA
synchronize around every step, nothing else. MFU uses the recipe's own flops_per_token and peak
table. The ratio is recipe/bare of tokens/s (below 1 means the recipe is slower).

Without a CUDA device it prints why and exits with status 2. Not imported by tests or any CPU path.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import common  # bench/common.py (this directory is on sys.path)

HERE = Path(__file__).resolve()
VOCAB, SEQ_LEN = 128256, 2048


def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_throughput: no CUDA device is available here "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
            "this benchmark needs one GPU. Nothing was run.",
            file=sys.stderr,
        )
        sys.exit(2)


def bare_main(argv: list[str], device_type: str = "cuda") -> None:
    p = argparse.ArgumentParser(prog="gpu_throughput.py --bare")
    p.add_argument("--model", default="1b")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--global-batch", type=int, required=True)
    p.add_argument("--micro-batch", type=int, required=True)
    p.add_argument("--seq-len", type=int, default=SEQ_LEN)
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from recipes.gpt.data import BatchPlan
    from recipes.gpt.model import ModelArgs, Transformer, flops_per_token
    from recipes.gpt.parallel import init_distributed
    from recipes.gpt.train import peak_flops

    device = init_distributed(device_type, 1800)
    world = dist.get_world_size()
    args = ModelArgs(**common.conf_yaml("model", a.model))
    with torch.device(device):
        model = Transformer(args)
    model.init_weights(seed=0)
    model.checkpoint_blocks = True
    mesh = init_device_mesh(device_type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.layers:
        block.compile()
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)

    plan = BatchPlan.for_world(a.global_batch, world, a.micro_batch)
    batch = torch.randint(0, a.vocab, (plan.per_rank, a.seq_len + 1), device=device)
    chunks = batch.split(plan.micro_batch)
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    times = []
    for _ in range(a.steps):
        sync()
        began = time.perf_counter()
        common.bare_train_step(model, opt, chunks)
        sync()
        times.append(time.perf_counter() - began)
    if dist.get_rank() == 0:
        tokens = plan.global_batch * a.seq_len
        peak = peak_flops(device)
        flops_tok = flops_per_token(args, a.seq_len)
        rows = [
            {
                "step_time_s": t,
                "tokens_per_s": tokens / t,
                "mfu": flops_tok * tokens / t / (peak * world) if peak else None,
            }
            for t in times
        ]
        Path(a.out).write_text(json.dumps({"steps": rows, "device": str(device)}))
    dist.destroy_process_group()


def _median(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return common.median(vals) if vals else None


def _fmt_mfu(x: float | None) -> str:
    return f"{x * 100:.1f}%" if x is not None else "n/a (device not in the recipe's peak table)"


def driver(a: argparse.Namespace, tmp: Path) -> None:
    from machine import describe

    env = common.bench_env(tmp / "home", omp_threads=common.threads_per_rank(1))
    run_dir = tmp / "run"
    recipe_cmd = common.torchrun(
        1, "-m", "recipes.gpt.train",
        f"model={a.model}", "data=synthetic", f"data.vocab_size={VOCAB}",
        f"data.seq_len={a.seq_len}", "data.dtype=uint32",
        "trainer.device=cuda", "trainer.param_dtype=bf16", "trainer.compile=true",
        "trainer.activation_checkpointing=true",
        f"trainer.global_batch_size={a.global_batch}", f"trainer.micro_batch_size={a.micro_batch}",
        f"trainer.max_steps={a.steps}", f"checkpoint.every_steps={a.steps + 1}",
        f"run_dir={run_dir}",
    )  # fmt: skip
    bare_out = tmp / "bare.json"
    bare_cmd = common.torchrun(
        1, str(HERE), "--bare", f"--model={a.model}", f"--steps={a.steps}",
        f"--global-batch={a.global_batch}", f"--micro-batch={a.micro_batch}",
        f"--seq-len={a.seq_len}", f"--out={bare_out}",
    )  # fmt: skip
    print(describe())
    print(
        f"gpu_throughput: model={a.model} 1 rank, bf16, compiled, activation checkpointing, "
        f"global_batch={a.global_batch} micro_batch={a.micro_batch} seq_len={a.seq_len} "
        f"steps={a.steps} warmup={a.warmup}"
    )
    for cmd, log in ((recipe_cmd, "recipe.log"), (bare_cmd, "bare.log")):
        print("running:", common.show(cmd), flush=True)
        common.run_logged(cmd, env, tmp / log, a.timeout_s)
    recipe_rows = common.read_metrics(run_dir)
    common.check_steps(recipe_rows, a.steps, 1, str(run_dir))
    recipe_rows = recipe_rows[a.warmup :]
    bare_rows = json.loads(bare_out.read_text())["steps"][a.warmup :]

    r_tps, b_tps = _median(recipe_rows, "tokens_per_s"), _median(bare_rows, "tokens_per_s")
    print(
        f"recipe: median tokens/s {r_tps:,.0f}  MFU {_fmt_mfu(_median(recipe_rows, 'mfu'))}  ({len(recipe_rows)} steps)"
    )
    print(
        f"bare:   median tokens/s {b_tps:,.0f}  MFU {_fmt_mfu(_median(bare_rows, 'mfu'))}  ({len(bare_rows)} steps)"
    )
    print(f"ratio recipe/bare (tokens/s): {r_tps / b_tps:.3f}")


def main() -> None:
    _require_cuda()
    if len(sys.argv) > 1 and sys.argv[1] == "--bare":
        return bare_main(sys.argv[2:])
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="1b", help="a conf/model name")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10, help="leading steps left out (compilation)")
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=SEQ_LEN)
    p.add_argument("--timeout-s", type=int, default=1800, help="per launched command")
    p.add_argument("--keep", action="store_true", help="keep the run directory and logs")
    a = p.parse_args()
    if not 0 <= a.warmup < a.steps:
        p.error("--warmup must leave at least one measured step")
    with common.state_dir("spillway-bench-gpu-", a.keep) as tmp:
        driver(a, tmp)


if __name__ == "__main__":
    common.run_main(main)
