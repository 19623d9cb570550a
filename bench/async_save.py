"""How long a checkpoint save blocks training: async Checkpointer saves against sync ones.

    python bench/async_save.py                # model=small, 2 ranks, 7 saves of each kind
    python bench/async_save.py --reps 15

Under `torchrun --standalone --nproc_per_node=2` (this file re-invokes itself with --worker),
each rank builds the model from conf/model/<model>.yaml, shards it with the recipe's own
`parallelize` (FSDP2, fully_shard per block + root), builds the recipe's AdamW and takes one
real optimizer step so the optimizer state exists. Then it alternates saves through two
Checkpointers on temp storage roots, one with async_save=False and one with async_save=True,
each save at a new step (keep=2, so pruning is part of the cost, as in training).

Per save it records, as the maximum over ranks (the slowest rank is what training waits for):
  call:     wall time of the `save()` call, which is what the training loop is blocked for;
  blocking: the Checkpointer's own `last_save_blocking_s`;
  commit:   for async, wall time from the start of `save()` to the return of `wait()`, i.e.
            until the checkpoint is written, hashed, manifested and renamed (committed).
The headline ratio is async/sync of the median `call` time: below 1 means async blocks less.
One save of each kind is made first and left out of the medians (warmup).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import common  # bench/common.py (this directory is on sys.path)
from common import median

HERE = Path(__file__).resolve()


def worker(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="async_save.py --worker")
    p.add_argument("--model", default="small")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from orchestrator.checkpoint.distributed import Checkpointer
    from orchestrator.checkpoint.manifest import verify
    from orchestrator.checkpoint.storage import open_root
    from recipes.gpt.model import ModelArgs, Transformer
    from recipes.gpt.optim import build_optimizer
    from recipes.gpt.parallel import build_mesh, init_distributed, parallelize

    device = init_distributed("cpu", 600)
    rank = dist.get_rank()
    args = ModelArgs(**common.conf_yaml("model", a.model))
    with torch.device(device):
        model = Transformer(args)
    model.init_weights(seed=0)
    model = parallelize(model, build_mesh("cpu"), "fp32", False, False)
    optim_cfg = SimpleNamespace(**common.conf_yaml("optim", "adamw"))
    optimizer = build_optimizer(model, optim_cfg)

    # One real step, so AdamW's exp_avg / exp_avg_sq exist and are saved.
    g = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, args.vocab_size, (8, 65), generator=g)
    logits = model(tokens[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    local_bytes = sum(p.to_local().nbytes for p in model.parameters())
    local_bytes += sum(
        t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes
        for s in optimizer.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    )

    ckpts = {
        "sync": Checkpointer(os.path.join(a.root, "sync"), keep=2, async_save=False),
        "async": Checkpointer(os.path.join(a.root, "async"), keep=2, async_save=True),
    }
    results: dict[str, list[dict]] = {"sync": [], "async": []}
    step = 0
    for rep in range(a.reps + 1):  # rep 0 is the warmup
        for kind in ("sync", "async") if rep % 2 == 0 else ("async", "sync"):
            ckpt = ckpts[kind]
            step += 1
            extra = {"tokens_seen": step * 1024, "run_id": "bench", "kind": kind}
            dist.barrier()
            began = time.perf_counter()
            ckpt.save(step, model, optimizer, extra)
            call = time.perf_counter() - began
            blocking = ckpt.last_save_blocking_s
            committed = ckpt.wait() if kind == "async" else step
            commit = time.perf_counter() - began
            assert committed in (step, None), (committed, step)
            row = torch.tensor([call, blocking, commit], dtype=torch.float64)
            dist.all_reduce(row, op=dist.ReduceOp.MAX)
            results[kind].append(
                {
                    "step": step,
                    "warmup": rep == 0,
                    **dict(zip(("call", "blocking", "commit"), row.tolist(), strict=True)),
                }
            )

    # What a full re-verification of one checkpoint costs rank 0 (commits use the ranks' hashes).
    rehash_s, ckpt_bytes = None, None
    if rank == 0:
        fs, root = open_root(os.path.join(a.root, "sync"))
        last = sorted(n for n in fs.ls(root, detail=False) if not n.endswith(".tmp"))[-1]
        ckpt_bytes = sum(fs.size(f) for f in fs.find(last))
        began = time.perf_counter()
        verify(fs, last, check_hashes=True)
        rehash_s = time.perf_counter() - began
    for ckpt in ckpts.values():
        ckpt.close()
    sizes = [None] * dist.get_world_size()
    dist.all_gather_object(sizes, local_bytes)
    if rank == 0:
        Path(a.out).write_text(
            json.dumps(
                {
                    **results,
                    "world_size": dist.get_world_size(),
                    "state_bytes_per_rank": sizes,
                    "checkpoint_bytes": ckpt_bytes,
                    "rehash_s": rehash_s,
                }
            )
        )
    dist.destroy_process_group()


def _ms(s: float) -> str:
    return f"{s * 1e3:8.1f} ms"


def driver(a: argparse.Namespace, tmp: Path) -> None:
    from machine import CpuWatch, describe

    env = common.bench_env(tmp / "home", omp_threads=common.threads_per_rank(a.nproc))
    out = tmp / "result.json"
    cmd = common.torchrun(
        a.nproc, str(HERE), "--worker", f"--model={a.model}", f"--reps={a.reps}",
        f"--root={tmp / 'storage'}", f"--out={out}",
    )  # fmt: skip
    print(describe())
    print(
        f"async_save: model={a.model} ranks={a.nproc} reps={a.reps} (+1 warmup each) storage={tmp}"
    )
    print("command:", common.show(cmd))
    watch = CpuWatch()
    common.run_logged(cmd, env, tmp / "worker.log", a.timeout_s)
    res = json.loads(out.read_text())

    mib = 2**20
    print(
        f"state per rank (params + AdamW state, local shards): "
        f"{', '.join(f'{b / mib:.1f} MiB' for b in res['state_bytes_per_rank'])}; "
        f"one committed checkpoint on disk: {res['checkpoint_bytes'] / mib:.1f} MiB"
    )
    med = {}
    for kind in ("sync", "async"):
        rows = [r for r in res[kind] if not r["warmup"]]
        warm = next(r for r in res[kind] if r["warmup"])
        med[kind] = {k: median(r[k] for r in rows) for k in ("call", "blocking", "commit")}
        calls = " ".join(f"{r['call'] * 1e3:.1f}" for r in rows)
        print(f"  {kind:5s} save() call per rep (ms): {calls}   [warmup {warm['call'] * 1e3:.1f}]")
    print("medians (max over ranks)        sync        async")
    print(f"  save() call (blocks loop)  {_ms(med['sync']['call'])} {_ms(med['async']['call'])}")
    print(
        f"  last_save_blocking_s       {_ms(med['sync']['blocking'])} {_ms(med['async']['blocking'])}"
    )
    print(
        f"  start to committed         {_ms(med['sync']['commit'])} {_ms(med['async']['commit'])}"
    )
    print(
        f"ratio async/sync, save() call time:       {med['async']['call'] / med['sync']['call']:.3f}"
    )
    print(
        f"ratio async/sync, last_save_blocking_s:   {med['async']['blocking'] / med['sync']['blocking']:.3f}"
    )
    print(
        f"ratio async/sync, time to commit:         {med['async']['commit'] / med['sync']['commit']:.3f}"
    )
    print(
        f"rank 0 full re-hash of one committed checkpoint (not part of a commit): {_ms(res['rehash_s'])}"
    )
    print(watch.report())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(sys.argv[2:])
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=("tiny", "small"), default="small")
    p.add_argument("--reps", type=int, default=7, help="measured saves of each kind")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--timeout-s", type=int, default=600)
    p.add_argument("--keep", action="store_true", help="keep the storage root and worker log")
    a = p.parse_args()
    if a.reps < 1:
        p.error("--reps must be >= 1")
    with common.state_dir("spillway-bench-async-", a.keep) as tmp:
        driver(a, tmp)


if __name__ == "__main__":
    common.run_main(main)
