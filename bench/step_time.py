"""Step time of the GPT recipe against a bare FSDP2 loop of the same model, both on 2 CPU ranks.

    python bench/step_time.py                 # model=tiny, 60 steps, 3 interleaved repeats
    python bench/step_time.py --model small   # the larger CPU size

Both sides run under `torchrun --standalone --nproc_per_node=2` with the same model class and
size, global batch 16, seq_len 64, micro-batch 8, AdamW, and FSDP2 `fully_shard` on every
block and then the root. The recipe side is `recipes.gpt.train` itself (data=synthetic, no
checkpoint before the final one); its figure is the median `step_time_s` of its metrics (the
run dir's segments) after the warmup steps. The bare side is the loop in `bare_main` below:
forward, loss, backward, optimizer step, nothing else (no data pipeline, LR schedule, clipping,
loss all-reduce, metrics or checkpoint poll). The ratio recipe/bare is the recipe's overhead:
above 1 is slower.

A third side, "bare+clip" (`--bare --clip 1.0`), is the same bare loop with torch's own
`clip_grad_norm_` at the recipe's default `optim.grad_clip` (1.0) before the optimizer step, as
torchtitan's loop does: the same math as the recipe, so recipe/bare+clip is the cost of the
recipe's machinery alone, and bare+clip/bare what clipping itself costs at this size.

A second recipe figure is the period between consecutive records' `time` (the wall clock at the
end of each step), which also counts what the recipe does outside its timed region (drain vote,
checkpoint poll, metrics write, progress).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import common  # bench/common.py (this directory is on sys.path)
from common import median, ms

HERE = Path(__file__).resolve()
GLOBAL_BATCH, MICRO_BATCH, SEQ_LEN = 16, 8, 64
GRAD_CLIP = float(common.conf_yaml("optim", "adamw")["grad_clip"])  # the recipe's default
CPU_MODELS = ("tiny", "small")


# ---- the baseline, run on every rank under torchrun ----------------------------------------


def bare_main(argv: list[str]) -> None:
    """The baseline: the same model and batch in a plain FSDP2 training loop."""
    p = argparse.ArgumentParser(prog="step_time.py --bare")
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", required=True)
    p.add_argument("--clip", type=float, default=0.0, help="clip_grad_norm_ to this (0: none)")
    a = p.parse_args(argv)

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from recipes.gpt.data import BatchPlan
    from recipes.gpt.model import ModelArgs, Transformer
    from recipes.gpt.parallel import init_distributed

    device = init_distributed("cpu", 600)
    rank, world = dist.get_rank(), dist.get_world_size()
    args = ModelArgs(**common.conf_yaml("model", a.model))
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
        common.bare_train_step(model, opt, data[step].split(plan.micro_batch), clip=a.clip)
        times.append(time.perf_counter() - began)
    if rank == 0:
        Path(a.out).write_text(json.dumps({"step_time_s": times, "world_size": world}))
    dist.destroy_process_group()


# ---- the driver ----------------------------------------------------------------------------


def _share(watch) -> str:
    got = watch.foreign()
    return "unknown" if got is None else f"{got[2]:.0%}"


def driver(a: argparse.Namespace, root: Path) -> None:
    from machine import CpuWatch, describe

    env = common.bench_env(root / "home", omp_threads=common.threads_per_rank(a.nproc))
    print(describe())
    print(
        f"step_time: model={a.model} ranks={a.nproc} global_batch={GLOBAL_BATCH} "
        f"micro_batch={MICRO_BATCH} seq_len={SEQ_LEN} steps={a.steps} warmup={a.warmup} "
        f"repeats={a.repeats} OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"
    )
    recipe_steps, recipe_periods, bare_steps, clip_steps, per_repeat = [], [], [], [], []
    whole = CpuWatch()
    for r in range(a.repeats):
        run_dir = root / f"run-{r}"
        recipe_cmd = common.torchrun(
            a.nproc, "-m", "recipes.gpt.train",
            f"model={a.model}", "data=synthetic", f"data.seq_len={SEQ_LEN}",
            f"trainer.global_batch_size={GLOBAL_BATCH}", f"trainer.micro_batch_size={MICRO_BATCH}",
            "trainer.device=cpu", f"trainer.max_steps={a.steps}",
            f"checkpoint.every_steps={a.steps + 1}", f"run_dir={run_dir}", *a.recipe_arg,
        )  # fmt: skip

        def bare_cmd(out: Path, clip: float) -> list[str]:
            return common.torchrun(
                a.nproc, str(HERE), "--bare", f"--model={a.model}", f"--steps={a.steps}",
                f"--out={out}", f"--clip={clip:g}",
            )  # fmt: skip

        outs = {"bare": root / f"bare-{r}.json", "bare+clip": root / f"bare-clip-{r}.json"}
        order = [
            ("recipe", recipe_cmd),
            ("bare", bare_cmd(outs["bare"], 0.0)),
            ("bare+clip", bare_cmd(outs["bare+clip"], GRAD_CLIP)),
        ]
        if r == 0:
            for name, cmd in order:
                print(f"{name + ' command:':<20}", common.show(cmd))
        # Rotate which side goes first so slow drift of the machine hits every side alike.
        watch = CpuWatch()
        for name, cmd in order[r % 3 :] + order[: r % 3]:
            common.run_logged(cmd, env, root / f"{name}-{r}.log", a.timeout_s)

        records = common.read_metrics(run_dir)
        common.check_steps(records, a.steps, a.nproc, str(run_dir))
        kept = records[a.warmup :]
        rs = [x["step_time_s"] for x in kept]
        rp = common.periods(kept)
        bs = json.loads(outs["bare"].read_text())["step_time_s"][a.warmup :]
        cs = json.loads(outs["bare+clip"].read_text())["step_time_s"][a.warmup :]
        recipe_steps += rs
        recipe_periods += rp
        bare_steps += bs
        clip_steps += cs
        rm, bm, cm = median(rs), median(bs), median(cs)
        per_repeat.append(rm / bm)
        print(
            f"  repeat {r + 1}: recipe step_time_s median {ms(rm)}, period {ms(median(rp))}; "
            f"bare {ms(bm)}; bare+clip {ms(cm)}; ratio recipe/bare {rm / bm:.3f}, "
            f"recipe/bare+clip {rm / cm:.3f}; other processes' cpu {_share(watch)}"
        )

    rm, pm, bm, cm = (median(x) for x in (recipe_steps, recipe_periods, bare_steps, clip_steps))
    print(f"recipe median step_time_s (metrics):  {ms(rm)}  over {len(recipe_steps)} steps")
    print(f"recipe median period between records: {ms(pm)}")
    print(f"bare FSDP2 loop median step time:     {ms(bm)}  over {len(bare_steps)} steps")
    print(f"bare loop + clip_grad_norm_ median:   {ms(cm)}  over {len(clip_steps)} steps")
    print(f"ratio recipe/bare (step_time_s): {rm / bm:.3f}  (per repeat {common.span(per_repeat)})")
    print(f"ratio recipe/bare (period):      {pm / bm:.3f}")
    print(f"ratio recipe/bare+clip (step_time_s): {rm / cm:.3f}  (the same math on both sides)")
    print(f"ratio bare+clip/bare:            {cm / bm:.3f}  (what clipping costs at this size)")
    print(whole.report())


def main() -> None:
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
    p.add_argument(
        "--recipe-arg",
        action="append",
        default=[],
        metavar="OVERRIDE",
        help="one more override for the recipe side, e.g. optim.grad_clip=0 (repeatable)",
    )
    a = p.parse_args()
    if not 0 <= a.warmup < a.steps - 1:
        p.error("--warmup must leave at least two measured steps")
    with common.state_dir("spillway-bench-step-", a.keep) as root:
        driver(a, root)


if __name__ == "__main__":
    common.run_main(main)
