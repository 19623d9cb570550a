"""Step time of the GPT recipe against a bare FSDP2 loop of the same model, both on 2 CPU ranks.

    python bench/step_time.py                 # model=tiny, 60 steps, 3 interleaved repeats
    python bench/step_time.py --model small   # the larger CPU size

Both sides run under `torchrun --standalone --nproc_per_node=2` with the same model class and
size, global batch 16, seq_len 64, micro-batch 8, AdamW, and FSDP2 `fully_shard` on every
block and then the root. The recipe side is `recipes.gpt.train` itself (data=synthetic, no
checkpoint before the final one); its figure is the median `step_time_s` of metrics.jsonl after
the warmup steps. The bare side is the loop in `bare_main` below: forward, loss, backward,
optimizer step, nothing else (no data pipeline, LR schedule, clipping, loss all-reduce,
metrics or checkpoint poll). The ratio recipe/bare is the recipe's overhead: above 1 is slower.

The recipe is started through this file (`--recipe-worker`), which calls the recipe's own
`main` after wrapping its MetricsWriter to stamp each record with a clock reading; that gives a
second figure, the period between consecutive records, which also counts what the recipe does
outside its timed region (checkpoint poll, metrics write, progress).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
GLOBAL_BATCH, MICRO_BATCH, SEQ_LEN = 16, 8, 64
CPU_MODELS = ("tiny", "small")


# ---- the two workers, run on every rank under torchrun -------------------------------------


def recipe_worker(overrides: list[str]) -> None:
    """Run the recipe unchanged except that each metrics record also carries a clock reading."""
    import recipes.gpt.train as recipe

    class StampedMetrics(recipe.MetricsWriter):
        def write(self, record):
            super().write({**record, "bench_clock_s": time.perf_counter()})

    recipe.MetricsWriter = StampedMetrics
    recipe.main(overrides)


def bare_main(argv: list[str]) -> None:
    """The baseline: the same model and batch in a plain FSDP2 training loop."""
    p = argparse.ArgumentParser(prog="step_time.py --bare")
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    import yaml
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from recipes.gpt.data import BatchPlan
    from recipes.gpt.model import ModelArgs, Transformer
    from recipes.gpt.parallel import init_distributed

    device = init_distributed("cpu", 600)
    rank, world = dist.get_rank(), dist.get_world_size()
    args = ModelArgs(
        **yaml.safe_load((REPO / "orchestrator" / "conf" / "model" / f"{a.model}.yaml").read_text())
    )
    with torch.device(device):
        model = Transformer(args)
    model.init_weights(seed=0)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)

    plan = BatchPlan.for_world(GLOBAL_BATCH, world, MICRO_BATCH)
    g = torch.Generator().manual_seed(rank)
    data = torch.randint(0, args.vocab_size, (a.steps, plan.per_rank, SEQ_LEN + 1), generator=g)
    times = []
    for step in range(a.steps):
        began = time.perf_counter()
        chunks = data[step].split(plan.micro_batch)
        for i, chunk in enumerate(chunks):
            model.set_requires_gradient_sync(i == len(chunks) - 1)
            logits = model(chunk[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten())
            (loss / len(chunks)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - began)
    if rank == 0:
        Path(a.out).write_text(json.dumps({"step_time_s": times, "world_size": world}))
    dist.destroy_process_group()


# ---- the driver ----------------------------------------------------------------------------


def _torchrun(nproc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
    ]


def _run(cmd: list[str], env: dict, log: Path, timeout_s: int) -> None:
    with log.open("w") as f:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s
        )
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        sys.exit(f"step_time: command failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")


def _share(watch) -> str:
    got = watch.foreign()
    return "unknown" if got is None else f"{got[2]:.0%}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def driver(a: argparse.Namespace) -> None:
    from machine import CpuWatch, describe

    root = Path(tempfile.mkdtemp(prefix="spillway-bench-step-"))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // a.nproc)))
    env["SPILLWAY_HOME"] = str(root / "home")  # the recipe's state stays in this temp dir
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)

    print(describe())
    print(
        f"step_time: model={a.model} ranks={a.nproc} global_batch={GLOBAL_BATCH} "
        f"micro_batch={MICRO_BATCH} seq_len={SEQ_LEN} steps={a.steps} warmup={a.warmup} "
        f"repeats={a.repeats} OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"
    )
    recipe_steps, recipe_periods, bare_steps, per_repeat = [], [], [], []
    whole = CpuWatch()
    try:
        for r in range(a.repeats):
            run_dir = root / f"run-{r}"
            overrides = [
                f"model={a.model}",
                "data=synthetic",
                f"data.seq_len={SEQ_LEN}",
                f"trainer.global_batch_size={GLOBAL_BATCH}",
                f"trainer.micro_batch_size={MICRO_BATCH}",
                "trainer.device=cpu",
                f"trainer.max_steps={a.steps}",
                f"checkpoint.every_steps={a.steps + 1}",
                f"run_dir={run_dir}",
            ]
            recipe_cmd = _torchrun(a.nproc) + [str(HERE), "--recipe-worker", *overrides]
            bare_out = root / f"bare-{r}.json"
            bare_cmd = _torchrun(a.nproc) + [
                str(HERE),
                "--bare",
                f"--model={a.model}",
                f"--steps={a.steps}",
                f"--out={bare_out}",
            ]
            if r == 0:
                print("recipe command:", " ".join(recipe_cmd))
                print("bare command:  ", " ".join(bare_cmd))
            # Alternate which side goes first so slow drift of the machine hits both alike.
            order = [("recipe", recipe_cmd), ("bare", bare_cmd)]
            watch = CpuWatch()
            for name, cmd in order if r % 2 == 0 else order[::-1]:
                _run(cmd, env, root / f"{name}-{r}.log", a.timeout_s)

            records = [
                json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            ]
            if [x["step"] for x in records] != list(range(1, a.steps + 1)) or any(
                x["world_size"] != a.nproc for x in records
            ):
                sys.exit(
                    f"step_time: {run_dir}/metrics.jsonl lacks steps or has another world size"
                )
            kept = [x for x in records if x["step"] > a.warmup]
            rs = [x["step_time_s"] for x in kept]
            rp = [
                b["bench_clock_s"] - p["bench_clock_s"]
                for p, b in zip(kept, kept[1:], strict=False)
            ]
            bs = json.loads(bare_out.read_text())["step_time_s"][a.warmup :]
            recipe_steps += rs
            recipe_periods += rp
            bare_steps += bs
            rm, bm = statistics.median(rs), statistics.median(bs)
            per_repeat.append(rm / bm)
            print(
                f"  repeat {r + 1}: recipe step_time_s median {_ms(rm)}, period {_ms(statistics.median(rp))}; "
                f"bare {_ms(bm)}; ratio {rm / bm:.3f}; other processes' cpu {_share(watch)}"
            )
    finally:
        if a.keep:
            print(f"kept run directories and logs under {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    rm, pm, bm = (statistics.median(x) for x in (recipe_steps, recipe_periods, bare_steps))
    print(f"recipe median step_time_s (metrics.jsonl): {_ms(rm)}  over {len(recipe_steps)} steps")
    print(f"recipe median period between records:      {_ms(pm)}")
    print(f"bare FSDP2 loop median step time:          {_ms(bm)}  over {len(bare_steps)} steps")
    print(
        f"ratio recipe/bare (step_time_s): {rm / bm:.3f}  "
        f"(per repeat {min(per_repeat):.3f}..{max(per_repeat):.3f})"
    )
    print(f"ratio recipe/bare (period):      {pm / bm:.3f}")
    print(whole.report())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--recipe-worker":
        return recipe_worker(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "--bare":
        return bare_main(sys.argv[2:])
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=CPU_MODELS, default="tiny")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="leading steps left out of the medians")
    p.add_argument("--repeats", type=int, default=3, help="recipe/bare pairs, run interleaved")
    p.add_argument("--nproc", type=int, default=2, help="ranks per side")
    p.add_argument("--timeout-s", type=int, default=600, help="per launched command")
    p.add_argument("--keep", action="store_true", help="keep run directories and logs")
    a = p.parse_args()
    if not 0 <= a.warmup < a.steps - 1:
        p.error("--warmup must leave at least two measured steps")
    driver(a)


if __name__ == "__main__":
    main()
